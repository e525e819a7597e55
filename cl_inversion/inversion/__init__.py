from cl_inversion.inversion.callback import InversionCallback
from cl_inversion.inversion.common import BNStatistics, SynthesisError
from cl_inversion.inversion.generator import Generator, GeneratorInversion
from cl_inversion.inversion.per_layer import PerLayerInversion
from cl_inversion.inversion.pixel import PixelInversion
from cl_inversion.inversion.remix import RemixInversion
from cl_inversion.inversion.replay import BufferReplay, GeneratorReplay

__all__ = ["InversionCallback", "BNStatistics", "SynthesisError", "Generator",
           "GeneratorInversion", "PerLayerInversion", "PixelInversion", "RemixInversion", "BufferReplay",
           "GeneratorReplay"]
