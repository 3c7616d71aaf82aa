"""Shipping a trained model: ONNX export and int8, inference measurements, scoring files with an exported folder."""
