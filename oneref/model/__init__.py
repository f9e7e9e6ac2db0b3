"""The OneRef model: BEiT-3 multiway encoder, output projections, REC/RES/MRefM heads."""

from oneref.model.oneref import HEADS, EncoderOutput, OneRef, RECOutput, RESOutput

__all__ = ["OneRef", "EncoderOutput", "RECOutput", "RESOutput", "HEADS"]
