"""Send a PNG to whichever configured loggers can show images."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def log_image(logger: Any, key: str, path: Path, step: int) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)], step=step)
    elif isinstance(logger, TensorBoardLogger):
        import numpy as np
        from PIL import Image

        logger.experiment.add_image(key, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
