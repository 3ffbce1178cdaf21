"""Deploying a student: ONNX export, int8 quantisation, and running it in ONNX Runtime."""
