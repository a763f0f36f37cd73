"""Answers that need no model: ``rat-lens models`` imports neither torch nor TransformerLens,
and ``rat-lens trace`` refuses out-of-range layers and targets from the model's config file
before its weights load (issue 23, point 3)."""

import subprocess
import sys

import pytest
import torch

from rat_lens.cli import main
from rat_lens.models import available_sources, catalogue, config_shape, load
from rat_lens.models._catalogue import smollm2_cached, smollm2_gguf
from rat_lens.models._convert import has_native_bridge

TEXT = "cat dog red blue green cat dog red"
HEAVY = ("torch", "transformers", "transformer_lens")


def test_models_command_prints_the_catalogue_without_importing_torch_or_transformer_lens():
    script = (
        "import sys\n"
        "from rat_lens.cli import main\n"
        "main(['models'])\n"
        f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "imported: []"
    names = [line.split()[0] for line in done.stdout.splitlines()[:-1]]
    assert names == ["induction-2l", "smollm2", "NAME"]


def test_catalogue_read_from_files_agrees_with_importing_transformer_lens():
    offline = {name: here for name, here, _ in catalogue()}
    assert offline["induction-2l"] == bool(available_sources())
    smollm2 = smollm2_gguf() is not None or smollm2_cached().exists()
    assert offline["smollm2"] == (smollm2 and has_native_bridge())


def test_config_shape_is_what_the_loaded_model_has(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rat_lens.models import load_induction_tokenizer

    model = load("induction-2l")
    assert config_shape("induction-2l") == (model.cfg.n_layers, model.cfg.n_ctx)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    load_induction_tokenizer().save_pretrained(tmp_path)
    folder = load(str(tmp_path))
    assert config_shape(str(tmp_path)) == (folder.cfg.n_layers, folder.cfg.n_ctx) == (3, 48)


@pytest.mark.parametrize("name", ["gpt2", "no/such-model", "/no/such/folder"])
def test_config_shape_is_none_where_no_local_config_says(name):
    assert config_shape(name) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "0:5"], "layers[1]=5 out of range for n_layers 2 (valid: -2..1)"),
        (["--layers=-3:1"], "layers[0]=-3 out of range for n_layers 2 (valid: -2..1)"),
        (["--layer", "2"], "layer=2 out of range for n_layers 2 (valid: -2..1)"),
        (["--target-pos", "64"], "target_pos=64 out of range for the context length n_ctx 64"),
        (["--target-pos", "-1", "-65"], "target_pos=-65 out of range for the context length"),
    ],
)
def test_trace_refuses_out_of_range_indices_before_the_model_loads(
    args, message, monkeypatch, capsys
):
    def no_load(*_, **__):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("rat_lens.models.load", no_load)
    assert main(["trace", TEXT, *args]) == 2
    err = capsys.readouterr().err
    assert err == f"rat-lens trace: error: {err.split(': error: ')[1]}" and message in err


def test_a_local_folder_is_checked_from_its_config_json_alone(tmp_path, capsys):
    # No weights in the folder: only a check that runs before the load can answer.
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 4, "max_position_embeddings": 32}')
    assert main(["trace", TEXT, "--model", str(tmp_path), "--layers", "0:4"]) == 2
    assert "layers[1]=4 out of range for n_layers 4" in capsys.readouterr().err


def test_targets_are_not_checked_against_the_context_when_generating(monkeypatch):
    # --generate replaces --target-pos by the generated positions: a stale value is no error.
    loaded = []
    monkeypatch.setattr("rat_lens.models.load", lambda *a, **k: loaded.append(a) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["trace", TEXT, "--target-pos", "99", "--generate", "2"])
    assert loaded == [("induction-2l",)]
