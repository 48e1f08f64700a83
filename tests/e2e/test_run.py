"""`shoal run` / `shoal report` / `shoal config` as a user types them."""

import shutil
import subprocess

import pytest

from tests.conftest import SHOAL, TINY, crash_after_checkpoint, metric_records, shoal, threads_for, torch_threads

pytestmark = pytest.mark.e2e


def test_run_leaves_a_complete_run_directory_and_report(tmp_path):
    out = shoal("run", *TINY, "train.steps=6", "checkpoint.every=3", "checkpoint.keep=0", "train.eval_every=3",
                cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "quickstart"
    assert "step 6/6" in out.stdout  # plain progress lines when stdout is not a terminal
    assert [r["step"] for r in metric_records(run, "train")] == list(range(1, 7))
    assert (run / "config.toml").read_text().count("steps = 6") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "logs" / "rank0.log").is_file() and (run / "logs" / "rank1.log").is_file()
    assert "world 2 on cpu" in (run / "logs" / "rank1.log").read_text()
    for rank in (0, 1):  # the default thread budget shares the cores between the 2 workers
        assert torch_threads((run / "logs" / f"rank{rank}.log").read_text()) == [threads_for(2)]
    assert "rank 1" not in out.stdout  # other ranks stay quiet
    report = shoal("report", str(run), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "steps: 6" in report.stdout and "tokens/s" in report.stdout and "gradient exchange" in report.stdout
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = shoal("run", *TINY, "train.steps=2", cwd=tmp_path)  # a second run never reuses the first's folder
    assert again.returncode == 0 and (tmp_path / "runs" / "quickstart-1" / "metrics.jsonl").is_file()


def test_resume_after_a_crash_repeats_the_uninterrupted_losses_bit_for_bit(tmp_path):
    args = [*TINY, "train.steps=40", "checkpoint.every=5", "checkpoint.keep=0"]
    clean = shoal("run", *args, "log.name=clean", cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr
    expected = {r["step"]: r["loss"] for r in metric_records(tmp_path / "runs" / "clean", "train")}

    crash_after_checkpoint(args, tmp_path, "crash", 5)  # launcher and both workers die at once
    run = tmp_path / "runs" / "crash"
    before = metric_records(run, "train")
    assert before[-1]["step"] < 40, "the run finished before it could be killed"

    resumed = shoal("run", *args, "log.name=crash", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = metric_records(run, "train")
    # each step once: the killed attempt's records after its checkpoint were dropped at resume
    assert [r["step"] for r in after] == list(range(1, 41))
    for r in after:
        assert r["loss"] == expected[r["step"]], f"step {r['step']} differs after resume"


@pytest.mark.parametrize("args, message", [
    (["train.stesp=3"], "unknown key train.stesp (did you mean 'steps'?)"),
    (["train.steps=ten"], "train.steps: expected int, got 'ten'"),
    (["train.steps=0"], "train.steps = 0 is below its minimum 1"),
    (["data.source=text", "data.path=missing.txt"], "data.path: missing.txt does not exist"),
    (["bad.toml"], "malformed TOML"),
    (["absent.toml"], "config file absent.toml not found"),
    (["--resume"], "--resume: no checkpoint found for run 'quickstart'"),
    (["parallel.dp_replicate=3"], "multiply to 3, but the world has 2"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "bad.toml").write_text("[train\nsteps=")
    out = shoal("run", *TINY, *args, cwd=tmp_path, timeout=60) if "=" in args[0] or args[0].startswith("--") \
        else shoal("run", *args, *TINY, cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error:") and message in lines[0], out.stderr


def test_resume_refuses_an_incompatible_checkpoint_and_leaves_it_untouched(tmp_path):
    assert shoal("run", *TINY, "train.steps=3", cwd=tmp_path).returncode == 0
    checkpoint = tmp_path / "runs" / "quickstart" / "checkpoints" / "step_00000003"
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    out = shoal("run", *TINY, "train.steps=6", "model.dim=32", "--resume", cwd=tmp_path)
    assert out.returncode == 2
    assert "was saved with model.dim = 64, but the config now says 32" in out.stderr
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before


def test_a_failing_worker_shows_its_own_traceback(tmp_path):
    (tmp_path / "boom.py").write_text(
        "import os, torch\n"
        "class Boom(torch.nn.Module):\n"
        "    def __init__(self, spec):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(spec.vocab_size, spec.vocab_size)\n"
        "    def forward(self, x):\n"
        "        if os.environ['RANK'] == '1':\n"
        "            raise RuntimeError('rank one exploded in forward')\n"
        "        return self.emb(x)\n")
    out = shoal("run", *TINY, "train.steps=3", "model.factory=boom:Boom", cwd=tmp_path,
                env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1
    assert "shoal: worker rank 1 failed:" in out.stderr
    assert "RuntimeError: rank one exploded in forward" in out.stderr
    assert "ChildFailedError" not in out.stderr and "torch/distributed/elastic" not in out.stderr.split("failed:")[0]


def test_print_config_and_config_reference(tmp_path):
    out = shoal("run", "train.steps=77", "--print-config", cwd=tmp_path)
    assert out.returncode == 0 and "steps = 77" in out.stdout and "[parallel]" in out.stdout
    assert not (tmp_path / "runs").exists()
    ref = shoal("config", "--help", cwd=tmp_path)
    assert ref.returncode == 0
    assert "grad_accum = 1" in ref.stdout and "Micro-batches per rank per step" in ref.stdout


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
def test_live_progress_bar_on_a_terminal(tmp_path):
    command = " ".join([SHOAL, "run", *TINY, "train.steps=4"])
    out = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout
    assert "━" in out.stdout and "4/4" in out.stdout and "tokens/s" in out.stdout
    assert "step 4/4  loss" not in out.stdout  # not the plain-line mode
