"""Profiles: round trip, atomic write, corrupt and old files, fingerprint mismatch, starting profiles."""

from __future__ import annotations

import json
import os

import pytest

from specexec_cli import profiles
from specexec_cli.errors import SpecexecError
from specexec_cli.profiles import Profile

SETTINGS = {
    "method": "specexec",
    "draft": "qwen2.5-coder-0.5b",
    "quantization": "fp32",
    "budget": 8,
    "max_n_beams": 8,
    "max_beam_len": 8,
    "max_branch_width": 8,
    "offload": "none",
}


def tuned(fingerprint: str = "abc123def456", target: str = "qwen2.5-coder-1.5b", **settings) -> Profile:
    return Profile(
        target=target,
        settings={**SETTINGS, **settings},
        fingerprint=fingerprint,
        hardware={"gpus": [], "cpu": "AMD EPYC", "ram_gib": 24, "torch": "2.13"},
        measured={"tokens_per_s": 3.1, "autoregressive_tokens_per_s": 2.5, "speedup": 1.24},
        source="specexec tune (test)",
    )


def test_profiles_dir_honours_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert profiles.profiles_dir() == tmp_path / "cfg" / "specexec" / "profiles"


def test_round_trip(tmp_path):
    profile = tuned()
    path = profiles.save_profile(profile, tmp_path)
    assert path == tmp_path / "qwen2.5-coder-1.5b@abc123def456.json"
    loaded = profiles.load_profile(path)
    assert loaded == profile and loaded.created_at  # save stamps the time
    assert json.loads(path.read_text())["schema_version"] == profiles.SCHEMA_VERSION


def test_hub_ids_make_safe_file_names(tmp_path):
    path = profiles.save_profile(tuned(target="meta-llama/Llama-2-70b-chat-hf"), tmp_path)
    assert path.name == "meta-llama_Llama-2-70b-chat-hf@abc123def456.json"
    assert profiles.resolve_profile("meta-llama/Llama-2-70b-chat-hf", tmp_path) == path


def test_save_is_atomic(tmp_path, monkeypatch):
    path = profiles.save_profile(tuned(), tmp_path)
    before = path.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        profiles.save_profile(tuned(budget=64), tmp_path)
    assert path.read_text() == before  # the old profile is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{ not json", "is corrupt \\(invalid JSON at line 1\\)"),
        ("", "is corrupt"),
        ("[1, 2]", "not a specexec profile"),
        (
            '{"schema_version": 0, "target": "x", "settings": {}}',
            "schema version 0, this specexec reads version 1",
        ),
        ('{"target": "x", "settings": {}}', "schema version None"),
        ('{"schema_version": 1, "settings": {}}', "has no 'target'"),
        ('{"schema_version": 1, "target": "x", "settings": {"budgte": 4}}', "unknown setting 'budgte'"),
        ('{"schema_version": 1, "target": "x", "settings": {"budget": "4"}}', "'budget' has the wrong type"),
        ('{"schema_version": 1, "target": "x", "settings": {"budget": 0}}', "'budget' must be >= 1"),
        ('{"schema_version": 1, "target": "x", "settings": {"method": "magic"}}', "unknown method 'magic'"),
        ('{"schema_version": 1, "target": "x", "settings": {}, "colour": 1}', "unknown profile field"),
        ('{"schema_version": 1, "target": "x", "settings": {}}', "needs a hardware fingerprint"),
    ],
)
def test_bad_profiles_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SpecexecError, match=message) as info:
        profiles.load_profile(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_binary_garbage_is_a_clear_error(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecexecError, match="cannot read profile"):
        profiles.load_profile(path)


def test_missing_profile(tmp_path):
    with pytest.raises(SpecexecError, match="no profile at"):
        profiles.load_profile(tmp_path / "none.json")


def test_find_profile_prefers_this_machine(tmp_path):
    mine = profiles.save_profile(tuned("aaaaaaaaaaaa", budget=16), tmp_path)
    profiles.save_profile(tuned("bbbbbbbbbbbb", budget=512), tmp_path)
    match = profiles.find_profile(
        "qwen2.5-coder-1.5b", "aaaaaaaaaaaa", directory=tmp_path, starting_dir=tmp_path / "x"
    )
    assert match.path == mine and match.warning is None and match.profile.settings["budget"] == 16


def test_find_profile_warns_on_a_fingerprint_mismatch(tmp_path):
    other = profiles.save_profile(tuned("bbbbbbbbbbbb"), tmp_path)
    match = profiles.find_profile(
        "qwen2.5-coder-1.5b", "cccccccccccc", directory=tmp_path, starting_dir=tmp_path / "x"
    )
    assert match.path == other
    assert "tuned on other hardware (AMD EPYC)" in match.warning and "specexec tune --target" in match.warning


def test_find_profile_raises_on_a_corrupt_profile_for_this_machine(tmp_path):
    (tmp_path / profiles.profile_filename("t", "ffffffffffff")).write_text("{")
    with pytest.raises(SpecexecError, match="corrupt"):
        profiles.find_profile("t", "ffffffffffff", directory=tmp_path, starting_dir=tmp_path / "x")


def starting(label: str, gpu_gib: int, ram_gib: int, budget: int) -> dict:
    return {
        "schema_version": 1,
        "kind": "starting",
        "target": "llama-2-70b",
        "hardware": {"label": label, "gpu_memory_gib": gpu_gib, "ram_gib": ram_gib},
        "settings": {**SETTINGS, "draft": "llama-2-7b", "budget": budget},
        "source": "cost model",
    }


def test_starting_profiles_pick_the_largest_class_this_machine_meets(tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name, args in {
        "a": ("24 GB GPU", 24, 128, 256),
        "b": ("12 GB GPU", 12, 64, 128),
        "c": ("CPU", 0, 32, 4),
    }.items():
        (shipped / f"{name}.json").write_text(json.dumps(starting(*args)))
    find = profiles.find_profile
    cls = {"gpu_memory_gib": 24, "ram_gib": 128}
    match = find("llama-2-70b", "f" * 12, cls, directory=tmp_path / "none", starting_dir=shipped)
    assert match.profile.settings["budget"] == 256 and match.path is None
    assert "starting profile for 24 GB GPU, derived from the cost model (not measured)" in match.warning
    match = find("llama-2-70b", "f" * 12, {"gpu_memory_gib": 16, "ram_gib": 64}, tmp_path / "none", shipped)
    assert match.profile.settings["budget"] == 128
    match = find("llama-2-70b", "f" * 12, {"gpu_memory_gib": 0, "ram_gib": 64}, tmp_path / "none", shipped)
    assert match.profile.settings["budget"] == 4
    assert (
        find("llama-2-70b", "f" * 12, {"gpu_memory_gib": 8, "ram_gib": 16}, tmp_path / "none", shipped)
        is None
    )
    assert find("other-model", "f" * 12, cls, tmp_path / "none", shipped) is None


def test_shipped_starting_profiles_are_valid():
    shipped = profiles.load_starting_profiles()
    assert shipped, "profiles/ at the top of the repository holds starting profiles"
    for profile in shipped:
        assert profile.kind == "starting"
        assert "cost model" in profile.source
        assert {"label", "gpu_memory_gib", "ram_gib"} <= set(profile.hardware)
        assert profile.predicted.get("tokens_per_s", 0) > 0


def test_apply_profile_lets_explicit_flags_win():
    merged = profiles.apply_profile(SETTINGS, {"budget": 32, "draft": None, "max_n_beams": None})
    assert merged["budget"] == 32 and merged["draft"] == SETTINGS["draft"]


def test_list_resolve_remove(tmp_path):
    assert profiles.list_profiles(tmp_path / "nothing") == []
    a = profiles.save_profile(tuned("aaaaaaaaaaaa"), tmp_path)
    b = profiles.save_profile(tuned("bbbbbbbbbbbb"), tmp_path)
    (tmp_path / "broken.json").write_text("{")
    entries = profiles.list_profiles(tmp_path)
    assert [e.path.name for e in entries] == ["broken.json", a.name, b.name]
    assert entries[0].profile is None and "corrupt" in entries[0].error
    table = profiles.format_profile_list(entries, fingerprint="aaaaaaaaaaaa")
    assert "unreadable" in table and "1.24x" in table and "yes" in table
    with pytest.raises(SpecexecError, match="matches several profiles"):
        profiles.resolve_profile("qwen2.5-coder-1.5b", tmp_path)
    assert profiles.resolve_profile("qwen2.5-coder-1.5b", tmp_path, fingerprint="bbbbbbbbbbbb") == b
    assert profiles.resolve_profile(a.stem, tmp_path) == a
    assert profiles.resolve_profile(str(a), tmp_path) == a
    assert profiles.remove_profile(a.name, tmp_path) == a and not a.exists()
    assert profiles.resolve_profile("qwen2.5-coder-1.5b", tmp_path) == b
    with pytest.raises(SpecexecError, match="no profile named 'nope'"):
        profiles.remove_profile("nope", tmp_path)


def test_format_profile_shows_settings_and_provenance(tmp_path):
    text = profiles.format_profile(tuned(), tmp_path / "p.json")
    assert "specexec draft=qwen2.5-coder-0.5b fp32 budget=8 beams=8x8" in text
    assert "measured    speedup: 1.240" in text and "abc123def456" in text
    assert json.loads(profiles.profile_json(tuned()))["target"] == "qwen2.5-coder-1.5b"
    auto = profiles.describe_settings({"method": "autoregressive", "quantization": "nf4"})
    assert auto == "autoregressive nf4"


def test_shipped_starting_profiles_match_the_cost_model(tmp_path):
    """profiles/*.json are what presets.write_starting_profiles makes today (regenerate if not)."""
    from specexec_cli.tuning.presets import write_starting_profiles

    written = write_starting_profiles(tmp_path)
    shipped = sorted(p.name for p in profiles.starting_profiles_dir().glob("*.json"))
    assert sorted(p.name for p in written) == shipped
    for path in written:
        assert path.read_text() == (profiles.starting_profiles_dir() / path.name).read_text(), path.name


def test_settings_for_generate(tmp_path, monkeypatch):
    monkeypatch.setattr(
        profiles, "current_hardware", lambda: ("abc123def456", {"gpu_memory_gib": 0, "ram_gib": 24})
    )
    settings, match = profiles.settings_for_generate("qwen2.5-coder-1.5b", {"budget": 4}, tmp_path, tmp_path)
    assert settings == {"budget": 4} and match is None
    profiles.save_profile(tuned(), tmp_path)
    settings, match = profiles.settings_for_generate(
        "qwen2.5-coder-1.5b", {"budget": 4, "draft": None}, tmp_path
    )
    assert settings == {**SETTINGS, "budget": 4} and match.warning is None
