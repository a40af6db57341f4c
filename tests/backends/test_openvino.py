from tests.backends.contract import BackendContract


class TestOpenVINO(BackendContract):
    backend_name = "openvino"
    target = "cpu"
    runtime_module = "openvino"
    bad_options = {"preset": "performance", "fast_bias_corection": False}


def test_usage_telemetry_is_sent_only_after_the_user_opted_in(tmp_path, monkeypatch):
    """OpenVINO's converter and NNCF post usage events (each one a fork of the build) when no consent
    file exists; edgepack turns them off in its process unless the consent file says the user opted in."""
    import pytest

    pytest.importorskip("openvino_telemetry")
    from openvino_telemetry import Telemetry
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    from openvino_telemetry.utils.sender import TelemetrySender

    from edgepack.backends.openvino import TELEMETRY_METHODS, quiet_usage_telemetry

    monkeypatch.setenv("HOME", str(tmp_path))  # the consent file lives under the home folder
    for var in ("CI", "TF_BUILD", "JENKINS_URL"):  # openvino_telemetry declines in CI by itself
        monkeypatch.delenv(var, raising=False)
    sent: list = []
    monkeypatch.setattr(TelemetrySender, "send", lambda self, backend, message: sent.append(message))
    quiet_usage_telemetry()
    quiet_usage_telemetry()  # idempotent: wrapped once
    assert all(getattr(getattr(Telemetry, m), "edgepack_quiet", False) for m in TELEMETRY_METHODS if hasattr(Telemetry, m))

    t = object.__new__(Telemetry)  # a fresh instance, not the process's singleton
    t.init(app_name="edgepack-test", app_version="0", tid="G-TEST", backend="ga4", enable_opt_in_dialog=False)
    assert t.consent  # no consent file: the library itself would send...
    Telemetry.send_event.__wrapped__(t, "ovc", "version", "x")
    assert len(sent) == 1
    Telemetry.send_event(t, "ovc", "version", "x")  # ...edgepack does not
    t.start_session("ovc")
    assert len(sent) == 1

    assert OptInChecker().update_result(ConsentCheckResult.ACCEPTED)  # the user opted in
    Telemetry.send_event(t, "ovc", "version", "x")
    assert len(sent) == 2
