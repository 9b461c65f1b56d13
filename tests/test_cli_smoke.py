import subprocess
import sys

from batchflux.cli import main


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "batchflux", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.startswith("batchflux ")
