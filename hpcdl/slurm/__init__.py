"""Submit the sbatch templates (package data, hpcdl/slurm/templates/) with their knobs filled; show a job's state."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hpcdl import config
from hpcdl.errors import HpcdlError

# Package data, so an installed hpcdl has them too (the checkout's slurm/*.sbatch are symlinks to these).
# sbatch needs a file on disk: hpcdl is installed unzipped, so this is a plain folder.
TEMPLATES_DIR = Path(str(resources.files("hpcdl.slurm") / "templates"))
# A template's knob is a line `NAME=${NAME:-default}`: the environment wins over the default.
KNOB = re.compile(r"^([A-Z][A-Z0-9_]*)=\$\{\1:-(.*?)\}(?=\s|$)", re.MULTILINE)
JOB_ID = re.compile(r"^\d+(_\d+)?$")
# sbatch options taken as positive integers (or >= 0 where a zero means "none").
COUNT_OPTIONS = {"nodes": 1, "ntasks_per_node": 1, "ntasks": 1, "cpus_per_task": 1, "gpus_per_node": 0}
TEXT_OPTIONS = ("time", "partition", "account", "job_name", "output", "array")


@dataclass(frozen=True)
class Submission:
    """One sbatch call: the knob values it exports and its command line."""

    knobs: dict[str, str]
    argv: list[str]

    def command_line(self) -> str:
        """The exact shell line that runs it (knobs as environment assignments)."""
        assignments = [f"{name}={quote(value)}" for name, value in self.knobs.items()]
        return " ".join([*assignments, *map(quote, self.argv)])


def quote(word: str) -> str:
    """Shell-quote a word as a person would: bare, 'single', else "double" quotes."""
    if shlex.quote(word) == word:
        return word
    if "'" not in word:
        return f"'{word}'"
    return '"' + re.sub(r'([\\"$`])', r"\\\1", word) + '"'


def template_names() -> list[str]:
    """The templates shipped with hpcdl, by name (train, train-gpu, ...)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.sbatch"))


def resolve_template(name: str) -> Path:
    """A template's file: a shipped template's name, or the path of an .sbatch file."""
    path = Path(name)
    if path.suffix == ".sbatch" and path.is_file():
        return path.resolve()
    if name in template_names():
        return TEMPLATES_DIR / f"{name}.sbatch"
    raise HpcdlError(f"slurm: unknown template '{name}' (templates: {', '.join(template_names())}, or an .sbatch file)")


def template_knobs(path: Path) -> dict[str, str]:
    """The knobs a template reads from the environment, with their defaults."""
    knobs: dict[str, str] = {}
    for name, default in KNOB.findall(path.read_text()):
        knobs.setdefault(name, default)  # the first assignment is the knob; later ones derive
    return knobs


def build_submission(template: str, options: dict[str, object]) -> Submission:
    """Validate the template, sbatch options and knobs; build the sbatch call (nothing is submitted)."""
    path = resolve_template(template)
    known = template_knobs(path)
    knobs = _knob_values(path.stem, known, options)
    argv = ["sbatch", "--parsable"]
    if knobs:
        # Values go through the environment: --export=NAME=value would split them at commas.
        argv.append("--export=ALL," + ",".join(knobs))
    for key, least in COUNT_OPTIONS.items():
        value = options.get(key)
        if value is not None:
            if not isinstance(value, int) or value < least:
                raise HpcdlError(f"slurm: --{key.replace('_', '-')} must be an integer >= {least}, got {value!r}")
            argv.append(f"--{key.replace('_', '-')}={value}")
    for key in TEXT_OPTIONS:
        if options.get(key):
            argv.append(f"--{key.replace('_', '-')}={options[key]}")
    argv += list(options.get("sbatch") or [])
    argv.append(str(path))
    return Submission(knobs, argv)


def _knob_values(template: str, known: dict[str, str], options: dict[str, object]) -> dict[str, str]:
    """The knobs to export: --config, --set, --launcher, --run-dir, --python and --knob NAME=VALUE."""
    knobs: dict[str, str] = {}
    for assignment in options.get("knob") or []:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise HpcdlError(f"slurm: --knob expects NAME=VALUE, got {assignment!r}")
        knobs[name] = value
    for key, name in (("launcher", "LAUNCHER"), ("run_dir", "RUN_DIR"), ("python", "HPCDL_PYTHON")):
        if options.get(key):
            knobs[name] = str(options[key])
    sets = list(options.get("set") or [])
    chosen = str(options.get("config") or knobs.get("CONFIG") or "")
    if chosen or sets:
        # Fail here, not in a queued job: the config (else the template's) and every --set must load.
        config.load(chosen or known.get("CONFIG", ""), sets)
    if chosen:
        # The job may start elsewhere (--chdir): a config file is passed by its absolute path.
        knobs["CONFIG"] = str(Path(chosen).resolve()) if Path(chosen).is_file() else chosen
    if sets:
        extra = " ".join(quote(arg) for assignment in sets for arg in ("--set", assignment))
        knobs["HPCDL_ARGS"] = f"{knobs['HPCDL_ARGS']} {extra}" if knobs.get("HPCDL_ARGS") else extra
    for name in knobs:
        if name not in known:
            raise HpcdlError(f"slurm: template {template} has no knob {name} (knobs: {', '.join(known) or 'none'})")
    if knobs.get("LAUNCHER", "srun") not in ("srun", "mpirun"):
        raise HpcdlError(f"slurm: --launcher must be srun or mpirun, got {knobs['LAUNCHER']!r}")
    return knobs


def submit(submission: Submission) -> int:
    """Run the sbatch call and return the job id."""
    if shutil.which("sbatch") is None:
        raise HpcdlError("slurm: sbatch not found; run on a Slurm login node (locally: make slurm-up)")
    result = subprocess.run(
        submission.argv, env={**os.environ, **submission.knobs}, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise HpcdlError(f"slurm: sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    # --parsable prints "<id>" or "<id>;<cluster>".
    return int(result.stdout.strip().split(";")[0])


def parse_fields(line: str) -> dict[str, str]:
    """Parse scontrol's 'Key=value Key=value' text; values may hold spaces."""
    # A field starts where a space is followed by Key= (keys may hold ':', '/').
    parts = re.split(r"\s+(?=[A-Za-z][\w:/]*=)", line.strip())
    return dict(part.split("=", 1) for part in parts if "=" in part)


def _sacct(job_id: str) -> list[dict[str, str]]:
    """The job's rows from sacct (array elements included); empty where accounting is off."""
    fields = ["JobID", "JobName", "State", "ExitCode", "Elapsed", "NodeList"]
    try:
        result = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line.strip()]


def _scontrol(job_id: str) -> list[dict[str, str]]:
    """The job's records from scontrol (one per array element); empty once it has forgotten the job."""
    try:
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []
    return [parse_fields(line) for line in result.stdout.splitlines() if line.strip()]


def _job_key(fields: dict[str, str]) -> str:
    """An array element's id as sacct writes it (123_4), else the job id."""
    if fields.get("ArrayTaskId") and fields.get("ArrayJobId"):
        return f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
    return fields.get("JobId", fields.get("JobID", ""))


def status(job_id: str, lines: int = 20) -> str:
    """State, exit code and restarts of a job (sacct when it works, else scontrol) and its log's tail."""
    if not JOB_ID.match(job_id):
        raise HpcdlError(f"slurm: '{job_id}' is not a job id (e.g. 1234 or 1234_5)")
    accounted = {row["JobID"]: row for row in _sacct(job_id)}
    controlled = {_job_key(fields): fields for fields in _scontrol(job_id)}
    if not accounted and not controlled:
        raise HpcdlError(f"slurm: job {job_id} is unknown to sacct and scontrol")
    out = []
    for key in sorted(set(accounted) | set(controlled)):
        row, fields = accounted.get(key, {}), controlled.get(key, {})
        state = row.get("State") or fields.get("JobState", "?")
        source = "sacct" if row else "scontrol"
        out.append(
            f"job {key} ({row.get('JobName') or fields.get('JobName', '?')}): {state}, "
            f"exit {row.get('ExitCode') or fields.get('ExitCode', '?')}, "
            f"restarts {fields.get('Restarts', '?')}, elapsed {row.get('Elapsed') or fields.get('RunTime', '?')}, "
            f"nodes {row.get('NodeList') or fields.get('NodeList', '?')}  [{source}]"
        )
        log = Path(fields["StdOut"]) if fields.get("StdOut") else None
        if log is None:
            out.append("  log: unknown (scontrol no longer knows the job; see its --output)")
        elif not log.is_file():
            out.append(f"  log: {log} (not written yet)")
        else:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"  log: {log} (last {len(tail)} lines)")
            out += [f"  | {line}" for line in tail]
    return "\n".join(out)


def _submit_command(args) -> int:
    options = {key: value for key, value in vars(args).items() if key not in ("func", "command", "action", "template")}
    submission = build_submission(args.template, options)
    print(submission.command_line(), flush=True)
    if args.dry_run:
        return 0
    print(f"submitted job {submit(submission)}")
    return 0


def _status_command(args) -> int:
    print(status(args.job_id, args.lines))
    return 0


def register(commands) -> None:
    """Add `hpcdl slurm submit|status` to the command line."""
    slurm = commands.add_parser("slurm", help="submit the sbatch templates, show a job's state and log")
    actions = slurm.add_subparsers(dest="action", required=True)
    submit_parser = actions.add_parser("submit", help="fill a template's knobs, print the sbatch line, submit it")
    submit_parser.add_argument("template", help=f"a template ({', '.join(template_names())}) or an .sbatch file")
    for key in COUNT_OPTIONS:
        submit_parser.add_argument(f"--{key.replace('_', '-')}", type=int, help="sbatch option")
    for key in TEXT_OPTIONS:
        submit_parser.add_argument(f"--{key.replace('_', '-')}", help="sbatch option")
    submit_parser.add_argument(
        "--config", help="CONFIG knob: a named config or a TOML file (checked before submitting)"
    )
    submit_parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="added to HPCDL_ARGS (checked)"
    )
    submit_parser.add_argument("--launcher", help="LAUNCHER knob: srun or mpirun")
    submit_parser.add_argument("--run-dir", help="RUN_DIR knob: the run's folder (default runs/<job name>-<job id>)")
    submit_parser.add_argument("--python", help="HPCDL_PYTHON knob: the python that has hpcdl (default python3)")
    submit_parser.add_argument(
        "--knob", action="append", default=[], metavar="NAME=VALUE", help="any other knob of the template"
    )
    submit_parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="another sbatch option, e.g. --sbatch=--qos=long",
    )
    submit_parser.add_argument("--dry-run", action="store_true", help="print the sbatch line, submit nothing")
    submit_parser.set_defaults(func=_submit_command)
    status_parser = actions.add_parser("status", help="a job's state, exit code, restarts and the tail of its log")
    status_parser.add_argument("job_id", help="a job id (or array element, 1234_5)")
    status_parser.add_argument("--lines", type=int, default=20, help="lines of the log to show")
    status_parser.set_defaults(func=_status_command)
