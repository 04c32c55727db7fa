"""JobConfig: one frozen, validated description of a training job.

Sources, later ones win:  built-in defaults (the digits job)  <  the job file (TOML)
<  ``MPITRAIN_<SECTION>_<KEY>`` environment variables  <  ``--set section.key=value``.

Every key is declared once, as a dataclass field whose metadata says what is allowed;
validation walks those declarations, so an unknown section or key, a wrong type or a value
out of range becomes one :class:`ConfigError` naming where the value came from (file,
variable or option), the key, and what is allowed.  This module reads no environment
itself: the caller (the context) hands it the variables.
"""
from __future__ import annotations

import dataclasses
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import ConfigError
from .schema import (ALGORITHMS, DELIVERY_MODES, RECOVERY_MODES, FaultRule, build, key, suggest,
                     toml_value)

ENV_PREFIX = "MPITRAIN_"
DEFAULT_EPOCHS = 10


@dataclass(frozen=True)
class RunConfig:
    seed: int = key(0, lo=0, doc="seed of the whole run: init, shuffling, synthetic data")
    epochs: int | None = key(None, lo=1, doc=f"passes over the training split "
                                             f"({DEFAULT_EPOCHS} when neither this nor steps is set)")
    steps: int | None = key(None, lo=1, doc="global steps; wins over epochs when both are set")
    out: str = key("runs/{job}", doc="output folder; {job} = job file stem, "
                                     "{slurm_job_id} = Slurm job id or 'local'")
    checkpoint_every: int = key(0, lo=0, doc="steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = key(3, lo=1, doc="newest checkpoints kept")
    log_every: int = key(10, lo=1, doc="steps between progress lines when not on a terminal")
    progress: str = key("auto", choices=("auto", "bar", "plain", "off"))
    blas_threads: int = key(1, lo=1, doc="BLAS threads per rank")
    device: str = key("cpu", choices=("cpu", "gpu"), doc="NumPy (cpu) or CuPy (gpu)")


@dataclass(frozen=True)
class DataConfig:
    source: str = key("digits", choices=("digits", "synthetic", "file"))
    path: str | None = key(None, doc=".npz with x and y, or a folder with x.npy and y.npy")
    batch_size: int = key(32, lo=1, doc="samples per rank per step")
    shuffle: bool = key(True)
    val_fraction: float = key(0.1, lo=0.0, hi=1.0, hi_open=True, doc="0 turns validation off")
    tail: str = key("drop", choices=("drop", "weighted"),
                    doc="last partial global batch of an epoch: dropped, or used with "
                        "per-rank weights so the mean stays exact")
    task: str = key("classification", choices=("classification", "regression"),
                    doc="synthetic only")
    samples: int = key(2048, lo=1, doc="synthetic only")
    features: int = key(16, lo=1, doc="synthetic only")
    classes: int = key(4, lo=2, doc="synthetic classification only")
    noise: float = key(0.1, lo=0.0, doc="synthetic only")


@dataclass(frozen=True)
class ModelConfig:
    layers: list[int] = key([64, 10], doc="widths after the input, output last")
    activation: str = key("relu", choices=("relu", "sigmoid", "tanh", "identity"))
    output: str = key("softmax", choices=("identity", "softmax"))
    loss: str = key("cross_entropy", choices=("mse", "cross_entropy"))
    init: str = key("auto", doc="auto, he, xavier, normal, or a path to an .npz of parameters")
    dtype: str = key("float32", choices=("float32", "float64"))


@dataclass(frozen=True)
class OptimConfig:
    name: str = key("adam", choices=("sgd", "momentum", "adam"))
    lr: float = key(0.005, lo=0.0, lo_open=True)
    momentum: float = key(0.9, lo=0.0, hi=1.0, hi_open=True, doc="momentum only")
    beta1: float = key(0.9, lo=0.0, hi=1.0, hi_open=True, doc="adam only")
    beta2: float = key(0.999, lo=0.0, hi=1.0, hi_open=True, doc="adam only")
    eps: float = key(1e-8, lo=0.0, lo_open=True, doc="adam only")
    weight_decay: float = key(0.0, lo=0.0, doc="L2 penalty added to the gradient")
    schedule: str = key("constant", choices=("constant", "step", "cosine"))
    warmup_steps: int = key(0, lo=0, doc="linear warm-up from 0 to lr")
    step_size: int = key(1000, lo=1, doc="schedule=step: steps between decays")
    gamma: float = key(0.1, lo=0.0, lo_open=True, doc="schedule=step: decay factor")


@dataclass(frozen=True)
class SyncConfig:
    algorithm: str = key("native", choices=ALGORITHMS)
    overlap: bool = key(True, doc="start each layer's allreduce during backward")
    check_every: int = key(100, lo=0, doc="steps between replica hash checks (0: start and end)")
    ledger: bool = key(True, doc="write the per-rank collective ledger (mpitrain diagnose)")
    bucket_bytes: int = key(0, lo=0, doc="fuse consecutive layers (last first) into one "
                                         "allreduce until it holds at least this many bytes "
                                         "of gradients; 0: one allreduce per layer")


@dataclass(frozen=True)
class FaultsConfig:
    delivery: str = key("strict", choices=DELIVERY_MODES)
    deadline_ms: float = key(10000.0, lo=0.0, lo_open=True)
    seed: int = key(0, lo=0)
    on_divergence: str = key("error", choices=("error", "warn"), doc="lossy mode")
    checksum: str = key("xxh3", choices=("xxh3", "crc32c", "none"),
                        doc="end-to-end checksum of every message in strict and reliable "
                            "delivery (lossy never checksums); none trusts MPI's own delivery")
    rules: list[FaultRule] = key([])
    recovery: str = key("abort", choices=RECOVERY_MODES,
                        doc="after a rank's death: abort (an attributed error; --restarts "
                            "relaunches) or shrink (survivors train on in place; needs ULFM)")
    min_ranks: int = key(1, lo=1, doc="shrink: the fewest ranks the job may go on with")


TRACE_STEPS_ALLOWED = '"A-B" (steps A to B, 1 <= A <= B), "A" (one step) or "" (off)'


def parse_trace_steps(text: str) -> tuple[int, int] | None:
    """``[trace] steps`` as (first, last) step, or None for "" (off); ValueError if malformed."""
    text = text.strip()
    if not text:
        return None
    first, dash, last = (part.strip() for part in text.partition("-"))
    if not first.isdigit() or (dash and not last.isdigit()):
        raise ValueError("not a step range")
    window = (int(first), int(last) if dash else int(first))
    if window[0] < 1 or window[1] < window[0]:
        raise ValueError("steps count from 1 and A must not exceed B")
    return window


@dataclass(frozen=True)
class TraceConfig:
    steps: str = key("", doc=f"steps recorded into OUT/trace.json: {TRACE_STEPS_ALLOWED}")
    messages: bool = key(True, doc="every gradient message as an arrow between ranks "
                                   "(false: spans and events only, for big runs)")

    @property
    def window(self) -> tuple[int, int] | None:
        """(first, last) traced step, or None when tracing is off."""
        return parse_trace_steps(self.steps)


SECTIONS: dict[str, type] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig,
    "optim": OptimConfig, "sync": SyncConfig, "faults": FaultsConfig, "trace": TraceConfig,
}


@dataclass(frozen=True)
class JobConfig:
    """The whole job, validated and frozen.  ``name`` is the job file stem."""

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    sync: SyncConfig
    faults: FaultsConfig
    trace: TraceConfig
    name: str = "default"
    path: str | None = None
    rule_sources: tuple[str, ...] = ()  # where each fault rule came from (file, --fault, ...)

    @property
    def epochs(self) -> int | None:
        """Epochs to train when ``[run] steps`` is not given."""
        return None if self.run.steps else (self.run.epochs or DEFAULT_EPOCHS)

    def out_dir(self, slurm_job_id: str | None = None) -> Path:
        return Path(self.run.out.format(job=self.name, slurm_job_id=slurm_job_id or "local"))

    def to_toml(self) -> str:
        """The resolved configuration as a job file that reproduces this run."""
        lines = [f"# resolved configuration of job '{self.name}'"]
        for sec in SECTIONS:
            obj = getattr(self, sec)
            lines.append(f"\n[{sec}]")
            rules = []
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if f.name == "rules":
                    rules = value
                elif value is not None:
                    lines.append(f"{f.name} = {toml_value(value)}")
            for rule in rules:
                lines.append("\n[[faults.rules]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in dataclasses.asdict(rule).items()
                          if v is not None]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loading
#: Where each value of a job came from, by (section, key): the job file's path,
#: ``environment MPITRAIN_...``, ``--set section.key=value`` or ``--fault``; keys left at
#: their default are absent.  Fault rules also have one entry each, ("faults", "rules[i]").
Origins = dict[tuple[str, str], str]


def load(path: str | Path | None = None, overrides: Sequence[str] = (),
         environ: Mapping[str, str] | None = None,
         extra_rules: Sequence[Mapping[str, Any]] = ()) -> JobConfig:
    """Build the JobConfig of a job file plus env variables and ``--set`` overrides.

    ``extra_rules`` (from ``--fault``) are appended to the fault rules of the other sources.
    """
    return load_with_origins(path, overrides, environ, extra_rules)[0]


def load_with_origins(path: str | Path | None = None, overrides: Sequence[str] = (),
                      environ: Mapping[str, str] | None = None,
                      extra_rules: Sequence[Mapping[str, Any]] = ()
                      ) -> tuple[JobConfig, Origins]:
    """:func:`load`, and where each value came from (:data:`Origins`)."""
    raw: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    name = "default"
    if path is not None:
        path = Path(path)
        name = path.stem
        _merge(raw, origin, _read_toml(path), str(path))
    for var, text in sorted((environ or {}).items()):
        if var.startswith(ENV_PREFIX):
            sec, k = _split_env(var)
            _merge(raw, origin, {sec: {k: _parsed(text, f"environment {var}")}},
                   f"environment {var}")
    for item in overrides:
        sec, k, value = _split_override(item)
        _merge(raw, origin, {sec: {k: value}}, f"--set {item}")
    rules_origin = origin.get(("faults", "rules"), "default")
    if extra_rules:
        rules = list(raw.get("faults", {}).get("rules", [])) + list(extra_rules)
        _merge(raw, origin, {"faults": {"rules": rules}}, "--fault")
    def where_of(sec: str) -> Callable[[str], str]:
        return lambda k: origin[(sec, k)]

    sections = {sec: build(cls, raw.get(sec, {}), sec, where_of(sec))
                for sec, cls in SECTIONS.items()}
    cfg = JobConfig(**sections, name=name, path=str(path) if path else None)
    _check_combinations(cfg, origin, str(path) if path else "the defaults")
    n_job_rules = len(cfg.faults.rules) - len(extra_rules)
    sources = tuple(rules_origin if i < n_job_rules else "--fault"
                    for i in range(len(cfg.faults.rules)))
    for i, source in enumerate(sources):
        origin[("faults", f"rules[{i}]")] = source
    return dataclasses.replace(cfg, rule_sources=sources), origin


def _read_toml(path: Path) -> dict:
    """The tables of a job file.  UTF-8, with or without a byte-order mark (as some editors
    write it); anything else is one message naming the line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"job file {path} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"job file {path} cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} "
                          f"cannot be decoded",
                          hint="save the job file as UTF-8 (TOML files are UTF-8)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _merge(raw: dict, origin: dict, data: dict, where: str) -> None:
    for sec, table in data.items():
        if sec not in SECTIONS:
            raise ConfigError(f"{where}: unknown section [{sec}]{suggest(sec, SECTIONS)}; "
                              f"allowed sections: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{sec}] must be a table of keys, got {table!r}")
        for k, value in table.items():
            raw.setdefault(sec, {})[k] = value
            origin[(sec, k)] = where


def _split_env(var: str) -> tuple[str, str]:
    rest = var[len(ENV_PREFIX):].lower()
    sec, _, k = rest.partition("_")
    if sec not in SECTIONS or not k:
        raise ConfigError(f"environment {var}: not a job setting; use MPITRAIN_<SECTION>_<KEY> "
                          f"with a section of {', '.join(SECTIONS)} (e.g. MPITRAIN_DATA_BATCH_SIZE)")
    return sec, k


def _split_override(item: str) -> tuple[str, str, Any]:
    lhs, eq, text = item.partition("=")
    sec, dot, k = lhs.strip().partition(".")
    if not eq or not dot or not k:
        raise ConfigError(f"--set {item}: expected section.key=value, e.g. --set optim.lr=0.01")
    return sec, k, _parsed(text, f"--set {item}")


def _parsed(text: str, where: str) -> Any:
    """:func:`parse_value`, its error naming ``where`` the text came from."""
    try:
        return parse_value(text)
    except ConfigError as err:
        err.message = f"{where}: {err.message}"
        raise


def parse_value(text: str) -> Any:
    """A TOML value (number, bool, quoted string, array, inline table); else the bare text.

    Text that opens an array, a table or a quoted string but is not valid TOML is a mistake,
    not a bare word: ConfigError saying what TOML expected."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.strip()[:1] in ("[", "{", '"', "'"):
            reason = str(exc).split(" (at ")[0]
            raise ConfigError(f"{text.strip()}: not a valid TOML value ({reason})",
                              hint="lists look like [64, 10], strings like \"ring\" (quote "
                                   "them for your shell: --set 'model.layers=[64, 10]')") from None
        return text.strip()


def parse_fault(text: str) -> dict:
    """A fault rule from the command line: 'kind=drop,step=3' or TOML 'kind="drop", step=3'."""
    try:
        return tomllib.loads(f"r = {{{text}}}")["r"]
    except tomllib.TOMLDecodeError:
        pass
    rule = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"--fault {text}: expected key=value pairs separated by commas, "
                              f"e.g. --fault 'kind=drop,step=3,layer=1'")
        rule[k.strip()] = _parsed(v, f"--fault {text}")
    return rule


def _check_combinations(cfg: JobConfig, origin: dict, default_where: str) -> None:
    """Rules that involve more than one key."""
    def where(sec: str, k: str) -> str:
        return origin.get((sec, k), default_where)

    m = cfg.model
    if m.loss == "cross_entropy" and m.output != "softmax":
        src = origin.get(("model", "loss")) or origin.get(("model", "output"), default_where)
        raise ConfigError(f"{src}: [model] loss = \"cross_entropy\" needs "
                          f"output = \"softmax\" (it is the log-loss of probabilities); "
                          f"use loss = \"mse\" for output = \"{m.output}\"")
    if cfg.data.source == "file" and not cfg.data.path:
        raise ConfigError(f"{where('data', 'source')}: [data] source = \"file\" needs "
                          f"[data] path (an .npz with arrays x and y, or a folder with x.npy "
                          f"and y.npy)")
    if cfg.data.path and cfg.data.source != "file":
        raise ConfigError(f"{where('data', 'path')}: [data] path is only read with "
                          f"source = \"file\" (source is \"{cfg.data.source}\")")
    if cfg.faults.checksum == "none" and cfg.faults.delivery == "reliable":
        src = origin.get(("faults", "checksum")) or origin.get(("faults", "delivery"), default_where)
        raise ConfigError(f"{src}: [faults] delivery = \"reliable\" needs a checksum "
                          f"(checksum = \"xxh3\" or \"crc32c\"): it detects corrupted messages "
                          f"by their checksum to resend them")
    _check_out(cfg.run.out, where("run", "out"))
    try:
        cfg.trace.window
    except ValueError as exc:
        raise ConfigError(f"{where('trace', 'steps')}: [trace] steps = "
                          f"{toml_value(cfg.trace.steps)}: {exc}; allowed: "
                          f"{TRACE_STEPS_ALLOWED}") from None


OUT_PLACEHOLDERS = ("job", "slurm_job_id")


def _check_out(out: str, where: str) -> None:
    """``[run] out`` names a folder, with at most the documented placeholders -- no
    attributes, indexes, conversions or format specs, which would expand to garbage."""
    label = f"{where}: [run] out = {out!r}"
    if not out.strip():
        raise ConfigError(f"{label}: must name a folder (e.g. \"runs/{{job}}\")")
    allowed = ", ".join(f"{{{p}}}" for p in OUT_PLACEHOLDERS)
    try:
        fields = [f for f in string.Formatter().parse(out) if f[1] is not None]
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}", hint=f"placeholders: {allowed}; write a brace "
                                                  f"itself as {{{{ or }}}}") from None
    for _, name, spec, conversion in fields:
        name = name or ""
        if name not in OUT_PLACEHOLDERS or spec or conversion:
            text = "{" + name + (f"!{conversion}" if conversion else "") + \
                (f":{spec}" if spec else "") + "}"
            close = "" if name in OUT_PLACEHOLDERS else suggest(name, OUT_PLACEHOLDERS)
            raise ConfigError(f"{label}: unknown placeholder {text}{close}",
                              hint=f"allowed: {allowed}")
