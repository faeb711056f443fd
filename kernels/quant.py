"""Weight-only quantized linear layers (int8 per output channel, int4 grouped)."""
IMPLEMENTATIONS = {"quant_linear": {}}
