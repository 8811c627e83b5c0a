"""Built-in phantoms: horseshoe (IDS paper), AAPM TG-119 C-shape, water box, slab box."""

from ._boxes import slab_box, water_box
from ._horseshoe import horseshoe
from ._tg119 import tg119

PHANTOMS = {"horseshoe": horseshoe, "tg119": tg119, "water": water_box, "slab": slab_box}

__all__ = ["PHANTOMS", "horseshoe", "slab_box", "tg119", "water_box"]
