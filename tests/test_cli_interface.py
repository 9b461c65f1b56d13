"""Issue 13, point 8: words that belong to the interface in use. Every subcommand explains
itself in `--help`, README's synopsis lists every option the parser has, a message advises the
setting in the caller's own words (a flag on the command line, an argument in the library), and
counts of one are singular."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchflux import batch
from batchflux.apiframe import ApiframeClient
from batchflux.cli import build_parser, main
from batchflux.config import Api
from batchflux.errors import ApiError, ConfigError
from batchflux.models import RunOptions
from batchflux.progress import summary_line

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
KEY = "afk_interface_words_7d1c"


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every subcommand of ``parser`` (nested ones too), found from the parser itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from subcommands(sub, (*path, name))


COMMANDS = dict(subcommands(build_parser()))


def flat(text: str) -> str:
    return " ".join(text.split())


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_the_subcommands_are_found_from_the_parser() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert names >= {"validate", "plan", "run", "report", "merge", "export", "verify", "sim",
                     "sim serve"}


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_subcommand_help_has_a_description_and_explains_its_arguments(
        path: tuple[str, ...], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    parser = COMMANDS[path]
    out = flat(help_of(capsys, *path))
    assert parser.description, f"`batchflux {' '.join(path)}` has no description"
    assert flat(parser.description) in out
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, f"{' '.join(path)} {choice.dest} has no help"
                assert flat(choice.help) in out
        elif not action.option_strings:
            assert action.help and action.help != argparse.SUPPRESS, (
                f"`batchflux {' '.join(path)}`: argument {action.metavar or action.dest} "
                "has no help text")
            assert flat(action.help) in out


def test_merge_names_its_sources_as_the_readme_does(capsys: pytest.CaptureFixture[str]) -> None:
    usage = flat(help_of(capsys, "merge")).split(" options: ")[0]
    assert "OUT [OUT ...]" in usage and "OUT_N" not in usage
    assert "batchflux merge OUT1 OUT2 ... --into OUT" in README


def synopsis() -> dict[str, str]:
    """README's synopsis block, by command: the text from ``batchflux CMD`` to the next."""
    match = re.search(r"<!-- readme:synopsis -->\s*```\w*\n(.*?)```", README, re.DOTALL)
    assert match, "README has no block marked synopsis"
    parts = re.split(r"^batchflux (\w+)", match.group(1), flags=re.MULTILINE)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def long_options(help_text: str) -> list[tuple[str, ...]]:
    """The long names of each option of a ``--help`` text (``-j N, --jobs N, --concurrency N``
    gives ``("--jobs", "--concurrency")``), ``--help`` left out."""
    options = []
    for line in help_text.splitlines():
        if not re.match(r"^  -", line):
            continue
        spelled = re.split(r"\s{2,}", line.strip())[0]
        names = tuple(n for n in re.findall(r"(?<![\w-])--[\w-]+", spelled) if n != "--help")
        if names:
            options.append(names)
    return options


@pytest.mark.parametrize("command", ["run", "plan", "validate", "report", "merge", "export",
                                     "verify"])
def test_the_readme_synopsis_lists_every_option_the_parser_has(
        command: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13.8: the README's `run` synopsis missed --sim-job-seconds, --api-key-file and
    --job-timeout. Each option must appear there by (one of) its long names."""
    monkeypatch.setenv("COLUMNS", "200")
    options = long_options(help_of(capsys, command))
    declared = [a for a in COMMANDS[(command,)]._actions
                if a.option_strings and "--help" not in a.option_strings]
    assert len(options) == len(declared)  # the help text was read whole
    if command == "run":
        assert {"--sim-job-seconds", "--api-key-file", "--job-timeout",
                "--allow-download-host"} <= {n for names in options for n in names}
    shown = synopsis()[command]
    missing = [names[0] for names in options
               if not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", shown)
                          for n in names)]
    assert not missing, f"README's `batchflux {command}` synopsis lacks {missing}"


# --------------------------------------------------------------------------------------------
# Messages in the caller's words


def test_plain_http_on_the_command_line_names_the_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APIFRAME_API_KEY", KEY)
    manifest = tmp_path / "job.yaml"
    manifest.write_text("prompts: [a red fox]\n", encoding="utf-8")
    code = main(["run", str(manifest), "--base-url", "http://api.example.com",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 78
    assert "(use https, a loopback host, or --insecure-http)" in err
    assert "allow_insecure" not in err


def test_plain_http_in_the_library_names_the_argument(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text("prompts: [a red fox]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        batch.run_batch(manifest, RunOptions(out_dir=tmp_path / "out"),
                        target=Api(api_key=KEY, base_url="http://api.example.com"))
    assert "(use https, a loopback host, or allow_insecure=True)" in str(info.value)
    assert "--insecure-http" not in str(info.value)
    with pytest.raises(ConfigError, match=r"or allow_insecure=True\)"):
        ApiframeClient(api_key=KEY, base_url="http://api.example.com")


async def test_a_refused_download_host_is_named_in_the_callers_words() -> None:
    from batchflux.wording import COMMAND_LINE

    class Sink:
        async def write(self, data: bytes) -> None:
            raise AssertionError("nothing may be downloaded")

    url = "https://cdn.example.net/x.png"
    async with ApiframeClient(api_key=KEY, base_url="https://api.example.com") as library:
        with pytest.raises(ApiError, match=r"allowed_download_hosts=\[HOST\] allows a host"):
            await library.download(url, Sink())
    async with ApiframeClient(api_key=KEY, base_url="https://api.example.com",
                              wording=COMMAND_LINE) as cli:
        with pytest.raises(ApiError, match=r"--allow-download-host HOST allows a host"):
            await cli.download(url, Sink())


# --------------------------------------------------------------------------------------------
# One is singular


def test_counts_of_one_are_singular_in_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13.8: "ok (1 items)". One item through validate, plan, run, verify, report,
    export and merge: every count of one reads singular."""
    manifest = tmp_path / "one.yaml"
    manifest.write_text("prompts: [a red fox]\ngrid: {seeds: [1]}\n", encoding="utf-8")
    out = tmp_path / "out"

    assert main(["validate", str(manifest)]) == 0
    assert capsys.readouterr().out == f"{manifest}: ok (1 item)\n"
    assert main(["plan", str(manifest), "--out", str(out)]) == 0
    plan = capsys.readouterr().out
    assert f"{manifest}: 1 item, model flux-2-dev" in plan
    assert "estimated cost: 2.00 credits for 1 item to run" in plan
    assert "first 1 item:" in plan

    assert main(["run", str(manifest), "--sim", "--sim-job-seconds", "0.1", "--out", str(out),
                 "--progress"]) == 0
    captured = capsys.readouterr()
    assert "batchflux: starting: 1 item\n" in captured.err

    assert main(["verify", str(out)]) == 0
    assert "1 item, 1 file checked: every file matches" in capsys.readouterr().out
    assert main(["report", str(out), "--html"]) == 0
    assert "(1 image, 0 failures)" in capsys.readouterr().out
    assert main(["export", str(out), "--dataset", "hf"]) == 0
    assert ": 1 image in " in capsys.readouterr().out
    assert main(["merge", str(out), "--into", str(tmp_path / "merged")]) == 0
    assert "merged 1 run into " in capsys.readouterr().out
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())


def test_the_summary_line_says_one_credit() -> None:
    line = summary_line({"counts": {"ok": 1, "failed": 0}, "credits_spent": 1},
                        Path("out"), simulated=False)
    assert ", 1 credit. images: " in line
    line = summary_line({"counts": {"ok": 2, "failed": 0}, "credits_spent": 4.0},
                        Path("out"), simulated=False)
    assert ", 4 credits. images: " in line
