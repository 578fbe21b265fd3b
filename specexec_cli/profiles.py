"""Profiles: the settings `specexec tune` found fastest for one target on one machine.

A profile is a schema-versioned JSON file in the user config folder (platformdirs; honours
XDG_CONFIG_HOME), named `<target>@<fingerprint>.json`, where the fingerprint names the hardware (see
`hardware.fingerprint`). It is written atomically (temporary file + os.replace). A corrupt file or one
written with another schema version gives a one-line `SpecexecError`, never a traceback.

Starting profiles ship as package data (`specexec_cli/data/profiles/`, see `profiles/README.md`):
settings for known targets on common hardware classes, derived from the cost model (not measured) and
labelled so. They are used when no tuned profile exists for the target.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specexec_cli.decoding.config import METHODS
from specexec_cli.errors import SpecexecError
from specexec_cli.fsutil import disk_full_as_error, expand_user
from specexec_cli.hardware import (
    GIB,
    GpuInfo,
    HostInfo,
    fingerprint_of,
    identity,
    query_gpus,
    query_host,
    torch_version,
    write_json_atomic,
)
from specexec_cli.settings import profile_types

SCHEMA_VERSION = 1
KINDS = ("tuned", "starting")
SUFFIX = ".json"

# Settings a profile may carry, with their types: the engine settings table's (settings.py). Anything
# else in a profile is an error, so a setting is never silently ignored.
SETTING_TYPES: dict[str, type | tuple[type, ...]] = profile_types()
POSITIVE_INTS = ("budget", "max_n_beams", "max_beam_len", "max_branch_width", "buffers", "batch_size")


@dataclass
class Profile:
    """One profile. `settings` holds generation settings (SETTING_TYPES); the rest is provenance."""

    target: str
    settings: dict
    kind: str = "tuned"
    fingerprint: str | None = None  # tuned: the machine it was measured on
    hardware: dict = field(default_factory=dict)  # tuned: hardware.identity(); starting: its class
    measured: dict = field(default_factory=dict)  # tokens_per_s, autoregressive_tokens_per_s, speedup
    predicted: dict = field(default_factory=dict)  # cost-model figures
    probe: dict | None = None  # the hardware probe the tune ran with (cached with the profile)
    source: str = ""
    notes: list[str] = field(default_factory=list)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


# --- locations --------------------------------------------------------------------------------


def profiles_dir() -> Path:
    """Where tuned profiles live: <user config dir>/specexec/profiles (honours XDG_CONFIG_HOME)."""
    import platformdirs

    return platformdirs.user_config_path("specexec") / "profiles"


def starting_profiles_dir() -> Path:
    """The shipped starting profiles: package data (`specexec_cli/data/profiles/`, described by the
    repository's `profiles/README.md`), so an installed specexec has them too."""
    from importlib import resources

    return Path(str(resources.files("specexec_cli").joinpath("data/profiles")))


def slug(name: str) -> str:
    """A target name as a file-name part: hub ids and paths become `owner_name`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("_.") or "target"


def profile_filename(target: str, fingerprint: str) -> str:
    return f"{slug(target)}@{fingerprint}{SUFFIX}"


# --- (de)serialisation ------------------------------------------------------------------------


def validate_settings(settings: Mapping, origin: str) -> None:
    """Raise SpecexecError naming `origin` if a setting is unknown or has the wrong type or value."""
    for key, value in settings.items():
        if key not in SETTING_TYPES:
            raise SpecexecError(f"{origin}: unknown setting {key!r}")
        expected = SETTING_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, expected):
            raise SpecexecError(f"{origin}: setting {key!r} has the wrong type ({type(value).__name__})")
    if "method" in settings and settings["method"] not in METHODS:
        raise SpecexecError(f"{origin}: unknown method {settings['method']!r}")
    for key in POSITIVE_INTS:
        if key in settings and settings[key] < 1:
            raise SpecexecError(f"{origin}: setting {key!r} must be >= 1, got {settings[key]}")


def profile_from_dict(data: object, origin: str) -> Profile:
    """A Profile from parsed JSON, or a one-line SpecexecError that names `origin`."""
    if not isinstance(data, dict):
        raise SpecexecError(f"{origin}: not a specexec profile (expected a JSON object)")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SpecexecError(
            f"{origin}: profile schema version {version!r}, this specexec reads version {SCHEMA_VERSION};"
            " run `specexec tune` again or remove it with `specexec profiles rm`"
        )
    known = set(Profile.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecexecError(f"{origin}: unknown profile field(s) {', '.join(unknown)}")
    for name in ("target", "settings"):
        if name not in data:
            raise SpecexecError(f"{origin}: profile has no {name!r}")
    if not isinstance(data["target"], str) or not isinstance(data["settings"], dict):
        raise SpecexecError(f"{origin}: profile 'target' must be a string and 'settings' an object")
    if data.get("kind", "tuned") not in KINDS:
        raise SpecexecError(f"{origin}: profile kind must be one of {', '.join(KINDS)}")
    validate_settings(data["settings"], origin)
    try:
        profile = Profile(**data)
    except TypeError as exc:
        raise SpecexecError(f"{origin}: malformed profile ({exc})") from None
    if profile.kind == "tuned" and not isinstance(profile.fingerprint, str):
        raise SpecexecError(f"{origin}: a tuned profile needs a hardware fingerprint")
    return profile


def load_profile(path: Path) -> Profile:
    """Read and check one profile file; any problem is a one-line SpecexecError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecexecError(f"no profile at {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecexecError(f"cannot read profile {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecexecError(
            f"profile {path} is corrupt (invalid JSON at line {exc.lineno}); remove it or run `specexec tune`"
        ) from None
    return profile_from_dict(data, f"profile {path}")


def save_profile(profile: Profile, directory: Path | None = None) -> Path:
    """Write a tuned profile atomically to its place in `directory` (default: profiles_dir())."""
    if profile.kind != "tuned" or not profile.fingerprint:
        raise ValueError("only tuned profiles with a fingerprint are saved to the profile folder")
    validate_settings(profile.settings, f"profile for {profile.target}")
    if not profile.created_at:
        profile.created_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = (directory or profiles_dir()) / profile_filename(profile.target, profile.fingerprint)
    data = profile.to_dict()
    need = len(json.dumps(data, indent=2)) + 4096
    with disk_full_as_error(path.parent, need, f"writing profile {path.name}"):
        write_json_atomic(path, data)
    return path


# --- finding profiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileEntry:
    """A profile file and what reading it gave: the profile, or the one-line error."""

    path: Path
    profile: Profile | None
    error: str | None = None


def list_profiles(directory: Path | None = None) -> list[ProfileEntry]:
    """Every *.json in the profile folder, sorted by name; unreadable ones carry their error."""
    directory = directory or profiles_dir()
    if not directory.is_dir():
        return []
    entries = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            entries.append(ProfileEntry(path, load_profile(path)))
        except SpecexecError as exc:
            entries.append(ProfileEntry(path, None, str(exc)))
    return entries


def resolve_profile(ref: str, directory: Path | None = None, fingerprint: str | None = None) -> Path:
    """The profile file that `ref` names: a path, a file name or stem in the profile folder, or a
    target name (the one tuned on this machine when `fingerprint` is given and several exist)."""
    directory = directory or profiles_dir()
    as_path = expand_user(ref)
    if as_path.suffix == SUFFIX and as_path.is_file():
        return as_path
    for candidate in (directory / ref, directory / f"{ref}{SUFFIX}"):
        if candidate.is_file():
            return candidate
    matches = sorted(directory.glob(f"{slug(ref)}@*{SUFFIX}")) if directory.is_dir() else []
    if fingerprint:
        mine = [p for p in matches if p.name == profile_filename(ref, fingerprint)]
        matches = mine or matches
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SpecexecError(f"no profile named {ref!r} in {directory} (see `specexec profiles list`)")
    names = ", ".join(p.stem for p in matches)
    raise SpecexecError(f"{ref!r} matches several profiles ({names}); name one of them")


def remove_profile(ref: str, directory: Path | None = None, fingerprint: str | None = None) -> Path:
    """Delete the profile `ref` names (see resolve_profile); returns its path."""
    path = resolve_profile(ref, directory, fingerprint)
    try:
        path.unlink()
    except OSError as exc:
        raise SpecexecError(f"cannot remove {path}: {exc.strerror or exc}") from None
    return path


def load_starting_profiles(directory: Path | None = None) -> list[Profile]:
    """The shipped starting profiles (kind "starting"); a broken one is a SpecexecError."""
    directory = directory or starting_profiles_dir()
    if not directory.is_dir():
        return []
    return [load_profile(path) for path in sorted(directory.glob(f"*{SUFFIX}"))]


def hardware_class(gpus: Sequence[GpuInfo], host: HostInfo) -> dict:
    """The coarse hardware class starting profiles are written for (largest GPU, PCIe, RAM)."""
    best = max(gpus, key=lambda g: g.memory_total, default=None)
    return {
        "gpu_memory_gib": round(best.memory_total / GIB) if best else 0,
        "pcie_gen": (best.pcie_gen_max if best else None),
        "pcie_width": (best.pcie_width_max if best else None),
        "ram_gib": round(host.ram_total / GIB),
    }


def current_hardware() -> tuple[str, dict]:
    """(fingerprint, hardware class) of this machine, without measuring anything."""
    gpus, _, _ = query_gpus()
    host = query_host()
    return fingerprint_of(identity(gpus, host, torch_version())), hardware_class(gpus, host)


def class_fits(required: Mapping, actual: Mapping) -> bool:
    """Whether a machine of class `actual` has at least the GPU memory and RAM of `required`, and a
    GPU exactly when `required` asks for one (5% slack for how vendors count a GB)."""
    need_gpu, have_gpu = required.get("gpu_memory_gib", 0), actual.get("gpu_memory_gib", 0)
    if (need_gpu > 0) != (have_gpu > 0):
        return False
    return have_gpu >= 0.95 * need_gpu and actual.get("ram_gib", 0) >= 0.95 * required.get("ram_gib", 0)


@dataclass(frozen=True)
class ProfileMatch:
    """The profile `generate` should use, where it came from, and a warning to print if any."""

    profile: Profile
    path: Path | None
    warning: str | None = None


def find_profile(
    target: str,
    fingerprint: str,
    machine_class: Mapping | None = None,
    directory: Path | None = None,
    starting_dir: Path | None = None,
) -> ProfileMatch | None:
    """The best profile for `target` on this machine, or None.

    Order: the tuned profile for this fingerprint; a tuned profile made on other hardware (warns);
    the largest shipped starting profile whose hardware class this machine meets (labelled as
    derived from the cost model). A corrupt or old-schema tuned profile raises SpecexecError.
    """
    directory = directory or profiles_dir()
    exact = directory / profile_filename(target, fingerprint)
    if exact.exists():
        return ProfileMatch(load_profile(exact), exact)
    others = sorted(directory.glob(f"{slug(target)}@*{SUFFIX}")) if directory.is_dir() else []
    if others:
        path = max(others, key=lambda p: p.stat().st_mtime)
        profile = load_profile(path)
        made_on = ", ".join(profile.hardware.get("gpus") or []) or profile.hardware.get("cpu", "?")
        return ProfileMatch(
            profile,
            path,
            f"profile {path.name} was tuned on other hardware ({made_on}); "
            f"run `specexec tune --target {target}` on this machine for settings that fit it",
        )
    starting = [p for p in load_starting_profiles(starting_dir) if p.target == target]
    if machine_class is not None:
        starting = [p for p in starting if class_fits(p.hardware, machine_class)]
    if not starting:
        return None
    chosen = max(starting, key=lambda p: (p.hardware.get("gpu_memory_gib", 0), p.hardware.get("ram_gib", 0)))
    label = chosen.hardware.get("label", "a common hardware class")
    return ProfileMatch(
        chosen,
        None,
        f"no tuned profile for {target}; using the starting profile for {label}, derived from the cost "
        f"model (not measured); `specexec tune --target {target}` measures this machine",
    )


def apply_profile(settings: Mapping, overrides: Mapping) -> dict:
    """Profile settings with the user's explicit flags on top (None means the flag was not given)."""
    merged = dict(settings)
    merged.update({key: value for key, value in overrides.items() if value is not None})
    return merged


def settings_for_generate(
    target_key: str,
    overrides: Mapping,
    directory: Path | None = None,
    starting_dir: Path | None = None,
) -> tuple[dict, ProfileMatch | None]:
    """What `specexec generate --target` runs with: the best profile for this machine (find_profile)
    with the explicit flags on top, and the match (its `.warning` is for stderr); ({flags}, None)
    when no profile applies. `target_key` is the registry's name for the target (resolve(t).name)."""
    fingerprint, machine_class = current_hardware()
    match = find_profile(target_key, fingerprint, machine_class, directory, starting_dir)
    return apply_profile(match.profile.settings if match else {}, overrides), match


# --- human output -----------------------------------------------------------------------------


def describe_settings(settings: Mapping) -> str:
    """One line such as `specexec draft=qwen2.5-coder-0.5b fp32 budget=16 beams=8x8`."""
    method = settings.get("method", "specexec")
    batch = f" batch={settings['batch_size']}" if settings.get("batch_size") else ""
    if method == "autoregressive":
        return f"autoregressive {settings.get('quantization', '')}".strip() + batch
    parts = [method, f"draft={settings.get('draft')}", settings.get("quantization", "")]
    if "budget" in settings:
        parts.append(f"budget={settings['budget']}")
    if "max_n_beams" in settings or "max_beam_len" in settings:
        parts.append(f"beams={settings.get('max_n_beams', '-')}x{settings.get('max_beam_len', 'auto')}")
    if settings.get("offload", "none") != "none":
        parts.append(f"offload={settings['offload']}/{settings.get('buffers', '-')}")
    if settings.get("max_memory"):
        parts.append("max-memory=" + ",".join(settings["max_memory"]))
    return " ".join(p for p in parts if p) + batch


def format_profile_list(entries: list[ProfileEntry], fingerprint: str | None = None) -> str:
    """A table of profiles: name, target, this machine?, tokens/s, speedup, settings."""
    if not entries:
        return "no tuned profiles (run `specexec tune --target NAME`)"
    rows = [("name", "target", "here", "tok/s", "speedup", "settings")]
    for entry in entries:
        p = entry.profile
        if p is None:
            rows.append((entry.path.stem, "?", "", "", "", f"unreadable: {entry.error}"))
            continue
        rate, speedup = p.measured.get("tokens_per_s"), p.measured.get("speedup")
        rows.append(
            (
                entry.path.stem,
                p.target,
                "yes" if fingerprint and p.fingerprint == fingerprint else "no",
                f"{rate:.2f}" if isinstance(rate, (int, float)) else "-",
                f"{speedup:.2f}x" if isinstance(speedup, (int, float)) else "-",
                describe_settings(p.settings),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    )


def format_profile(profile: Profile, path: Path | None = None) -> str:
    """A readable summary of one profile (for `profiles show` without --json)."""
    lines = [f"target      {profile.target}", f"kind        {profile.kind}"]
    if path is not None:
        lines.append(f"file        {path}")
    if profile.fingerprint:
        lines.append(f"fingerprint {profile.fingerprint}")
    if profile.hardware:
        lines.append(f"hardware    {json.dumps(profile.hardware, sort_keys=True)}")
    lines.append(f"settings    {describe_settings(profile.settings)}")
    for key, value in sorted(profile.settings.items()):
        lines.append(f"  {key:<16}{value}")
    for key, value in sorted(profile.measured.items()):
        lines.append(
            f"measured    {key}: {value:.3f}" if isinstance(value, float) else f"measured    {key}: {value}"
        )
    for key, value in sorted(profile.predicted.items()):
        lines.append(
            f"predicted   {key}: {value:.3f}" if isinstance(value, float) else f"predicted   {key}: {value}"
        )
    if profile.source:
        lines.append(f"source      {profile.source}")
    if profile.created_at:
        lines.append(f"created     {profile.created_at}")
    lines += [f"note        {note}" for note in profile.notes]
    return "\n".join(lines)


def profile_json(profile: Profile) -> str:
    return json.dumps(profile.to_dict(), indent=2, sort_keys=True)
