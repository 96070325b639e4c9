"""Cache keys and model fingerprints: the bytes they hash name every cache already on disk.

The pinned values were computed by the code these helpers replaced (each stage and flow hashed
json.dumps(key, sort_keys=True) itself); a change here makes every earlier prepared data set,
evaluation, export and continuous-round result look new.
"""

from __future__ import annotations

import os

from grpoflow.hashing import cache_key, model_fingerprint


def test_a_cache_key_keeps_the_bytes_earlier_runs_hashed():
    export_shaped = {"version": 1, "dtype": "bfloat16", "hub_repo_id": None, "note": "é ✓",
                     "model": ["/models/run-7/final", [("adapter_model.safetensors", 1048576, 1767225600123456789),
                                                       ("config.json", 612, 1767225600000000000)]]}
    assert cache_key(export_shaped) == "a9dffdd8320f25f371dd2a8db5a27d2ddadd1557d99f3cfe00a3dce1f3d9b56b"
    flow_shaped = ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", ["/models/base"],
                   {"learning_rate": 1e-05, "beta": 0.04}]  # flows/continuous.py's positional parts
    assert cache_key(flow_shaped) == "7bc8ca6724fc3b57ab1a9a2c42628e065c4b96896f4704ac59ba7f4bdbb00c48"


def test_a_model_is_its_files_names_sizes_and_times(tmp_path):
    model = tmp_path / "final"
    (model / "checkpoint-1").mkdir(parents=True)  # a subfolder is not part of the model
    (model / "adapter_model.safetensors").write_bytes(b"w" * 10)
    (model / "tokenizer_config.json").write_text("{}")
    os.utime(model / "adapter_model.safetensors", ns=(1, 1767225600123456789))
    os.utime(model / "tokenizer_config.json", ns=(1, 1767225600000000000))
    # the export stage's key held exactly this before the helper (so its caches stay valid)
    assert model_fingerprint(model) == [str(model.resolve()), [("adapter_model.safetensors", 10, 1767225600123456789),
                                                               ("tokenizer_config.json", 2, 1767225600000000000)]]
    assert model_fingerprint(str(model)) == model_fingerprint(model)

    before = cache_key({"model": model_fingerprint(model)})
    (model / "tokenizer_config.json").write_text('{"chat_template": "x"}')  # not only the weights count
    assert cache_key({"model": model_fingerprint(model)}) != before


def test_a_hub_id_stands_for_itself():
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct") == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
