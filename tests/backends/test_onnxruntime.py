from tests.backends.contract import BackendContract


class TestONNXRuntime(BackendContract):
    backend_name = "onnxruntime"
    target = "onnx"
    runtime_module = "onnxruntime"
    bad_options = {"quant_format": "qdq", "reduce_rnage": True}
