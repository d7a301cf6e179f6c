"""Site settings for SLURM jobs and the ``sbatch`` command line built from them.

A site is described once, in a small YAML file (``slurm/site.example.yaml``) or by flags of
``megatron-vwn slurm submit|sweep``; flags win over the file. Nothing site-specific is written
into ``slurm/train.sbatch``: partition, account, nodes, GPUs, time and container become sbatch
options or ``MVWN_*`` variables that the script reads (docs/slurm.md).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from megatron_vwn.config.errors import ConfigError
from megatron_vwn.config.loader import from_dict

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "slurm" / "train.sbatch"
SITE_ENV = "MVWN_SLURM_SITE"
_TIME_RE = re.compile(r"^((\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE)$")


class _SiteLoader(yaml.SafeLoader):
    """YAML without 1.1's base-60 integers, so ``time: 24:00:00`` stays a string."""


_SiteLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SiteLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))


@dataclass
class SiteConfig:
    """Where and how jobs run. None means "leave it to SLURM's defaults"."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int | None = None
    """GPUs per node (``--gpus-per-node``); None for CPU-only jobs."""
    nproc_per_node: int | None = None
    """Training ranks per node; None means gpus_per_node, or 1 without GPUs."""
    cpus_per_task: int | None = None
    """CPUs for the one task per node that runs torchrun (all its ranks share them)."""
    mem: str | None = None
    """Memory per node, sbatch syntax (``0`` = all of it); None: the partition's default."""
    exclusive: bool = False
    time: str | None = None
    """Time limit per job, sbatch syntax: ``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``."""
    signal_grace_s: int = 180
    """USR1 this many seconds before the time limit: finish the step, save, requeue."""
    requeue: bool = True
    """Requeue after a USR1 save (off automatically for job chains)."""
    container_image: str | None = None
    """enroot/pyxis image for the ranks (``srun --container-image``), e.g. a .sqsh file."""
    container_mounts: list[str] = field(default_factory=list)
    """``SRC:DST`` mounts for the container; the repository and data must be visible inside."""
    python: str | None = None
    """Python with megatron_vwn installed on the nodes; None: this one (shared file system), or
    ``python`` inside a container."""
    log_dir: str = "logs/slurm"
    """One log per job: ``<log_dir>/<job name>-<job id>.out`` (requeued runs append)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the job, e.g. ``NCCL_SOCKET_IFNAME``, ``NCCL_IB_HCA``."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further sbatch options, verbatim, e.g. ``["--mail-type=FAIL"]``."""

    def validate(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"site nodes ({self.nodes}) must be >= 1")
        for key in ("gpus_per_node", "nproc_per_node", "cpus_per_task"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"site {key} ({value}) must be >= 1")
        if self.signal_grace_s < 0:
            raise ConfigError(f"site signal_grace_s ({self.signal_grace_s}) must be >= 0")
        if self.time is not None and not _TIME_RE.match(self.time):
            raise ConfigError(
                f"site time ({self.time!r}) must be sbatch syntax: MM, HH:MM:SS or D-HH:MM:SS")
        if not isinstance(self.env, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in
                self.env.items()):
            raise ConfigError(f"site env ({self.env!r}) must map names to values")
        self.env = {k: str(v) for k, v in self.env.items()}

    @property
    def ranks_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def node_python(self) -> str:
        if self.python:
            return self.python
        return "python" if self.container_image else sys.executable


SITE_KEYS = [f.name for f in fields(SiteConfig)]


def load_site(path: str | Path | None = None, overrides: dict | None = None) -> SiteConfig:
    """The site file (``path``, else ``$MVWN_SLURM_SITE``, else none) with ``overrides``
    (flag values; None entries are ignored) on top, validated."""
    raw: dict = {}
    path = path or os.environ.get(SITE_ENV)
    if path:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"site file {str(file)!r} not found")
        loaded = yaml.load(file.read_text(), Loader=_SiteLoader) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: a site file is a mapping of settings, got {loaded!r}")
        raw.update(loaded)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(raw) - set(SITE_KEYS))
    if unknown:
        raise ConfigError(f"unknown site setting {unknown[0]!r}; allowed: {SITE_KEYS}")
    env = raw.pop("env", None) or {}
    site = from_dict(raw, SiteConfig, "site.")
    site.env = env
    site.validate()
    return site


@dataclass
class SbatchCommand:
    """One ``sbatch`` call: the environment it adds and its argument vector."""

    env: dict[str, str]
    argv: list[str]

    def shell(self) -> str:
        """A copy-pasteable shell line (``env K=V ... sbatch ...``)."""
        prefix = ["env", *(f"{k}={v}" for k, v in self.env.items())] if self.env else []
        return shlex.join([*prefix, *self.argv])


def sbatch_command(
    site: SiteConfig,
    job_name: str,
    train_args: list[str],
    dependency: str | None = None,
    requeue: bool | None = None,
    script: Path = SBATCH_SCRIPT,
) -> SbatchCommand:
    """The sbatch command that runs ``megatron-vwn train *train_args`` on the site."""
    requeue = site.requeue if requeue is None else requeue
    argv = ["sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={site.nodes}",
            "--ntasks-per-node=1", f"--output={site.log_dir}/%x-%j.out", "--open-mode=append",
            f"--signal=B:USR1@{site.signal_grace_s}", "--requeue" if requeue else "--no-requeue"]
    for key, option in (("partition", "partition"), ("account", "account"), ("qos", "qos"),
                        ("reservation", "reservation"), ("constraint", "constraint"),
                        ("time", "time"), ("cpus_per_task", "cpus-per-task"),
                        ("gpus_per_node", "gpus-per-node"), ("mem", "mem")):
        value = getattr(site, key)
        if value is not None:
            argv.append(f"--{option}={value}")
    if site.exclusive:
        argv.append("--exclusive")
    if dependency:
        argv.append(f"--dependency={dependency}")
    argv += [*site.sbatch_args, str(script), *train_args]
    env = {
        "MVWN_PYTHON": site.node_python,
        "MVWN_NPROC_PER_NODE": str(site.ranks_per_node),
        "MVWN_REQUEUE": "1" if requeue else "0",
    }
    if site.container_image:
        env["MVWN_CONTAINER_IMAGE"] = site.container_image
        if site.container_mounts:
            env["MVWN_CONTAINER_MOUNTS"] = ",".join(site.container_mounts)
    env.update(site.env)
    return SbatchCommand(env=env, argv=argv)
