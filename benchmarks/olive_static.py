"""Microsoft Olive's OnnxStaticQuantization pass with its defaults (QDQ, S8 activations and weights, per
tensor, MinMax), on an FP32 ONNX model and an .npz of calibration inputs (one array per model input, samples
along axis 0): the Olive peer row of benchmarks/int8_recovery.py (``--olive-python``). It imports nothing from
edgepack and runs with the interpreter of a venv that has olive-ai, whose pins are not ours:

    python -m venv olive && olive/bin/pip install torch==2.13.0 olive-ai==0.13.0 onnxruntime requests
    OLIVE_DISABLE_TELEMETRY=1 olive/bin/python benchmarks/olive_static.py MODEL.onnx CALIB.npz OUT.onnx
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

USER_SCRIPT = '''
import numpy as np
import torch
from olive.data.registry import Registry


class _Samples(torch.utils.data.Dataset):
    def __init__(self, path):
        with np.load(path) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.n = len(next(iter(self.arrays.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: torch.from_numpy(np.ascontiguousarray(v[i:i + 1])) for k, v in self.arrays.items()}, 0


@Registry.register_dataset()
def edgepack_npz(data_dir=None, path=None, **kwargs):
    return _Samples(path)


@Registry.register_dataloader()
def edgepack_unbatched(dataset, **kwargs):
    return torch.utils.data.DataLoader(dataset, batch_size=None)
'''


def main() -> None:
    model, calib, out = (Path(a).resolve() for a in sys.argv[1:4])
    from olive import run

    with tempfile.TemporaryDirectory(prefix="olive-") as tmp:
        script = Path(tmp) / "edgepack_data.py"
        script.write_text(USER_SCRIPT)
        config = {
            "input_model": {"type": "ONNXModel", "model_path": str(model)},
            "data_configs": [{"name": "calib", "user_script": str(script),
                              "load_dataset_config": {"type": "edgepack_npz", "path": str(calib)},
                              "dataloader_config": {"type": "edgepack_unbatched"}}],
            "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
            "output_dir": str(Path(tmp) / "out"), "cache_dir": str(Path(tmp) / "cache"),
            "log_severity_level": 3,
        }
        run(config)
        found = sorted((Path(tmp) / "out").rglob("*.onnx"))
        if not found:
            raise SystemExit("olive wrote no model")
        shutil.copy(found[0], out)
        data = [p for p in found[0].parent.iterdir() if p.suffix not in (".onnx", ".json")]
        for p in data:  # external weights, if any
            shutil.copy(p, out.parent / p.name)
    print(json.dumps({"model": str(out)}))


if __name__ == "__main__":
    main()
