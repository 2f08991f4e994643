"""How `glmtune` ends on Ctrl-C: status 130, whenever the second press lands."""
import subprocess
import sys
import textwrap

# A command stopped by Ctrl-C, and a second Ctrl-C delivered at the worst moment: while the first
# one's exit runs, just before exit_at_once_on_ctrl_c puts its handler in place (what the chat's
# "three quick Ctrl-C" test hit now and then: the process died by SIGINT instead of exiting 130).
SCRIPT = textwrap.dedent("""
    import signal, sys
    import glmtune.cli.main as m

    @m.app.command("stop-me")
    def stop_me():
        raise KeyboardInterrupt

    install = m.exit_at_once_on_ctrl_c
    def late_second_press():
        signal.raise_signal(signal.SIGINT)
        install()
    m.exit_at_once_on_ctrl_c = late_second_press
    sys.argv = ["glmtune", "stop-me"]
    m.main()
""")


def test_a_second_ctrl_c_during_the_exit_still_ends_with_130():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-800:])
    assert "Traceback" not in proc.stderr


def test_one_ctrl_c_ends_with_130():
    script = SCRIPT.replace("m.exit_at_once_on_ctrl_c = late_second_press", "")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-800:])
