"""The OneRef model: BEiT-3 multiway encoder, output projections, REC/RES/MRefM heads."""

from oneref.model.oneref import HEADS, EncoderOutput, OneRef, RECOutput, RESOutput
from oneref.model.vqkd import VQKDTokenizer

__all__ = ["OneRef", "EncoderOutput", "RECOutput", "RESOutput", "HEADS", "VQKDTokenizer"]
