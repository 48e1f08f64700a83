"""What every render target shares: the job's name, the command one node runs, readable YAML."""

from __future__ import annotations

import re
import shlex
from pathlib import Path


def node_command(cfg) -> str:
    """The shell command of one node: write the embedded config ($SHOAL_CONFIG) to a fresh file
    and `exec` `shoal launch` on it (so a preemption's SIGTERM reaches the launcher itself),
    with --resume when the run's checkpoint folder already holds a complete checkpoint: a pod
    restarted after preemption, or a job submitted again, continues instead of stopping."""
    from shoal.observe.rundir import checkpoint_folder
    folder = shlex.quote(str(checkpoint_folder(cfg, Path(cfg.log.dir) / cfg.log.name)))
    return ('config=$(mktemp) && printf "%s" "$SHOAL_CONFIG" > "$config" && '
            f'if ls {folder}/step_*/meta.json >/dev/null 2>&1; then set -- --resume; fi && '
            'exec shoal launch "$config" "$@"')


def dump_yaml(*documents: dict) -> str:
    """YAML documents with multi-line strings (the config, scripts) as readable `|` blocks."""
    try:
        import yaml
    except ImportError:
        from shoal.config import ConfigError
        raise ConfigError("rendering YAML needs PyYAML, which is not installed: pip install 'shoal[k8s]'") from None

    class BlockDumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    BlockDumper.add_representer(str, text)
    return yaml.dump_all(documents, Dumper=BlockDumper, sort_keys=False, width=120)


def job_name(cfg) -> str:
    """A name every target accepts (Kubernetes wants an RFC 1035 label)."""
    name = re.sub(r"[^a-z0-9-]+", "-", cfg.log.name.lower()).strip("-") or "shoal"
    return (name if name[0].isalpha() else f"shoal-{name}")[:50].rstrip("-")
