"""INT8 post-training quantization: activation calibrators (`calibrators`) and the calibration cache (`cache`)."""
