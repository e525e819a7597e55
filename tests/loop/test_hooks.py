"""What the task loop hands its `ContinualCallback` hooks."""

from helpers import run_in_process

RUN = ["scenario.n_tasks=3", "scenario.first_task_classes=4", "trainer.max_epochs=1",
       "trainer.enable_progress_bar=false", "logger=none", "checkpoint=false",
       "+callbacks.teacher._target_=tests.probe.TeacherProbe"]


def test_the_context_teacher_is_the_students_frozen_model_of_the_task_just_learned(tmp_path):
    seen = run_in_process("method=lwf", *RUN, run_dir=tmp_path / "lwf")["teacher_probe"]
    hooks = ["before_task", "between_tasks", "after_evaluation"]
    assert [(hook, task) for hook, task, *_ in seen] == [(h, t) for t in range(3) for h in hooks]
    assert seen[0][2:4] == ["none", False]  # before the first task there is no teacher yet
    assert all(kind == "previous" and frozen for _, _, kind, frozen, *_ in seen[1:])
    # classes seen up to the task (4 + 3 + 3 of digits' 10), and the last task flagged
    assert [(task, n_seen, is_last) for _, task, _, _, n_seen, is_last in seen[::3]] == [
        (0, 4, False), (1, 7, False), (2, 10, True)]
    # a method that keeps no frozen model hands none
    seen = run_in_process("method=finetune", *RUN, run_dir=tmp_path / "finetune")["teacher_probe"]
    assert {kind for _, _, kind, *_ in seen} == {"none"}
