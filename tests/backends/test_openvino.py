from tests.backends.contract import BackendContract


class TestOpenVINO(BackendContract):
    backend_name = "openvino"
    target = "cpu"
    runtime_module = "openvino"
    bad_options = {"preset": "performance", "fast_bias_corection": False}
