import dataclasses
from pathlib import Path

import pytest

from shoal import config
from shoal.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_toml_and_overrides_resolve(tmp_path):
    cfg = config.load(write(tmp_path, "[train]\nsteps = 7\nlr = 1\n[model]\nname = 'mlp'\n"),
                      ["train.batch_size=12", "checkpoint.async_save=true", "data.val_fraction=0.1"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.name) == (7, 1.0, "mlp")
    assert cfg.train.batch_size == 12 and cfg.checkpoint.async_save is True and cfg.data.val_fraction == 0.1
    assert cfg.log.name == "c"  # named after the file


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = config.load(None, ["model.factory=my.mod:build", "log.name=x"])
    again = config.load(write(tmp_path, config.to_toml(cfg)))
    assert config.to_dict(again) == config.to_dict(cfg)


@pytest.mark.parametrize("text, overrides, message", [
    ("[train]\nstesp = 3\n", [], "unknown key train.stesp (did you mean 'steps'?)"),
    ("[trian]\nsteps = 3\n", [], "unknown section [trian] (did you mean 'train'?)"),
    ("[train]\nsteps = 'many'\n", [], "train.steps: expected int"),
    ("", ["train.steps=abc"], "train.steps: expected int, got 'abc'"),
    ("", ["train.lr=-1"], "train.lr = -1.0 is below its minimum"),
    ("", ["train.lr=nan"], "train.lr = nan must be a finite number"),
    ("[sync]\nouter_lr = inf\n", [], "sync.outer_lr = inf must be a finite number"),
    ("", ["model.name=gtp"], "model.name = 'gtp' is not one of gpt, mlp, dlrm, cnn (did you mean 'gpt'?)"),
    ("", ["data.source=text"], "data.path is required"),
    ("", ["data.source=npy", "data.path=/no/such/dir"], "data.path: /no/such/dir does not exist"),
    ("", ["trainsteps=3"], "must look like section.key=value"),
    ("[train\nsteps = 3\n", [], "malformed TOML"),
    ("", ["model.factory=nocolon"], "must look like 'package.module:function'"),
    ("", ["checkpoint.async_save=maybe"], "checkpoint.async_save: expected bool"),
])
def test_bad_input_names_the_field(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), overrides)
    assert message in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


def test_every_field_has_help_and_is_documented():
    reference = config.reference()
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help text"
            assert f"  {f.name} = " in reference
    docs = (ROOT / "docs" / "config.md").read_text()
    assert config.reference(markdown=True) in docs, "docs/config.md is stale: run `shoal config --markdown`"


@pytest.mark.parametrize("sizes", [(3, 2), (1, 4, 2), (2, 2)])
def test_every_worker_of_every_site_draws_its_own_seed(sizes):
    """Sites of different sizes: rank 2 of a 3-worker site and rank 0 of the next 2-worker site had
    the same seed when the site's index was scaled by its own world size."""
    from shoal.config import rank_seed
    seeds = [rank_seed(1234, rank, site) for site, size in enumerate(sizes) for rank in range(size)]
    assert len(set(seeds)) == sum(sizes)
    assert rank_seed(1234, 3) == rank_seed(1234, 3, 0)  # one site: the streams of a run without sites


@pytest.mark.slow
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path, unbuffered):
    """`shoal plan ... | head -1`: the pipe closes under the writer, which stops with the shell's status
    for SIGPIPE (141) and no traceback, whether its output is buffered (the error shows at the final
    flush) or not (PYTHONUNBUFFERED: inside a print)."""
    import os
    import subprocess

    from tests.conftest import SHOAL
    config = tmp_path / "run.toml"
    config.write_text('[model]\nname = "gpt"\nflavour = "debug"\n')
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is already gone: the first write meets a closed pipe
    env = {**os.environ, "SHOAL_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": unbuffered}
    proc = subprocess.run([SHOAL, "plan", str(config), "--world", "2"], cwd=tmp_path, stdout=write_end,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, timeout=120)
    os.close(write_end)
    err = proc.stderr.decode()
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, (proc.returncode, err)
