"""Optional integrations (spconv, OpenPCDet, pytorch-quantization), each imported lazily."""
