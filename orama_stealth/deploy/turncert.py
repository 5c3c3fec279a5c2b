"""The TURN server serves the certificate Caddy holds for each stealth name (tls_mode acme).

Caddy keeps its keys readable by its own user only (0600 in 0700 directories) and rewrites
them on every renewal, so the TURN server cannot simply be pointed at them. A oneshot unit
copies Caddy's certificate and key for every cdn name to `/etc/orama/turn-tls/` (the main
name's as cert.pem/key.pem, every other name's under `<name>/`; root:<TURN group>, 0640) and
sends the listener serving that name SIGUSR2, which makes coturn reload certificate and key
without dropping allocations. A path unit runs it whenever Caddy's files for a name change, an
hourly timer catches anything the path unit missed. Caddy 2.6 has no event hook that could run
a command (that needs a plugin), hence systemd.

coturn has one certificate (no SNI selection), so each name has a TLS listener of its own
(deploy/turnlisteners.py): the main TURN server for `turn_cert_name` (default the first cdn
name), an `orama-turn-tls@<name>` coturn instance for every other. Adding a name starts its
instance, removing one stops and deletes its own; the others keep their processes and ports.

Rollback stops and removes the instances, the units, the script and the copies, restores the
TURN server's own `cert=`/`pkey=`/`min-port=`/`max-port=` lines and restarts it (it only reads
those at start).
"""

from __future__ import annotations

import base64
import logging
import shlex
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pyinfra.api.command import FunctionCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import caddyaccount, render, turnlisteners
from orama_stealth.deploy.ops.common import COMMAND_TIMEOUT, FACT_TIMEOUT, held_ports, put, sh
from orama_stealth.deploy.settings import HostDataLike, NodeSettings, SettingsError
from orama_stealth.deploy.turnlisteners import Listener, ListenerPlan

Commands = Generator[Any, None, None]
logger = logging.getLogger("orama_stealth.deploy")

TLS_DIR = turnlisteners.TLS_DIR
CERT = f"{TLS_DIR}/cert.pem"
KEY = f"{TLS_DIR}/key.pem"
SCRIPT = "/usr/local/lib/orama-stealth/turn-cert-sync"
SERVICE = "orama-turn-cert.service"
PATH_UNIT = "orama-turn-cert.path"
TIMER = "orama-turn-cert.timer"
UNIT_DIR = "/etc/systemd/system"
INSTANCE_TEMPLATE = f"{UNIT_DIR}/{turnlisteners.INSTANCE_UNIT}"
UNITS = tuple(f"{UNIT_DIR}/{u}" for u in (SERVICE, PATH_UNIT, TIMER))
DEFAULT_ACME_CA = "https://acme-v02.api.letsencrypt.org/directory"  # Caddy's default
DEFAULT_STORAGE = caddyaccount.DEFAULT_STORAGE
CERT_WAIT = 120  # seconds for Caddy to obtain a missing certificate through the router
LISTEN_WAIT = 10  # seconds for a started TURN listener to accept
MARK = "#orama-stealth# "
BEGIN = "# >>> orama-stealth managed: TURN TLS certificate from Caddy (removed by rollback)"
END = "# <<< orama-stealth managed"


@dataclass(frozen=True, slots=True)
class TurnCertSettings:
    name: str  # the stealth name whose certificate the main TURN server serves
    storage: str  # Caddy's storage directory on the node
    issuer_dir: str  # certificates/<issuer key> under it
    conf: str  # the TURN server's config file
    service: str  # its systemd unit
    group: str  # its group: may read the copies
    min_days: float  # certificate truth fails below this
    managed: bool  # the deploy gives the TURN server Caddy's certificate for `name`
    user: str = "turnserver"  # the instances run as this user (the TURN server's)
    turnserver_bin: str = "/usr/bin/turnserver"
    plan: ListenerPlan | None = None  # which listener serves which cdn name

    def caddy_file(self, name: str, ext: str) -> str:
        return f"{self.storage}/{self.issuer_dir}/{name}/{name}.{ext}"

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return self.plan.listeners if self.plan else (Listener(self.name, 5349, False),)

    @property
    def instances(self) -> tuple[Listener, ...]:
        return tuple(li for li in self.listeners if li.instance)

    def names(self) -> list[str]:
        return [li.name for li in self.listeners]


def copy_dir(li: Listener) -> str:
    """Where the TURN listener for `li.name` reads its certificate and key (and an instance
    its config)."""
    return f"{TLS_DIR}/{li.name}" if li.instance else TLS_DIR


def instance_conf_path(li: Listener) -> str:
    return f"{copy_dir(li)}/turnserver.conf"


def issuer_key(directory: str) -> str:
    """certmagic's storage key of an ACME directory: host (':' -> '-') and path ('/' -> '-')."""
    url = urlsplit(directory)
    key = url.netloc
    path = url.path.replace("\\", "-").replace("/", "-").strip("-")
    if path:
        key += "-" + path
    return key.lower().replace(":", "-")


def turn_cert_settings(s: NodeSettings, data: HostDataLike,
                       held: Mapping[str, int] | None = None) -> TurnCertSettings:
    """`held`: the instances' ports on the node (turnlisteners.plan)."""
    def text(key: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise SettingsError(f"host {s.host}: {key}: expected a non-empty word, got {value!r}")
        return value.strip()

    plan = turnlisteners.plan(s, data, held)
    raw_days = data.get("cert_min_days", 14)
    try:
        days = float(raw_days)
    except (TypeError, ValueError):
        days = -1.0
    if days < 0:
        raise SettingsError(f"host {s.host}: cert_min_days: expected a number of days >= 0, "
                            f"got {raw_days!r}")
    storage = text("caddy_storage", DEFAULT_STORAGE).rstrip("/")
    if not storage.startswith("/"):
        raise SettingsError(f"host {s.host}: caddy_storage: expected an absolute path on the "
                            f"node, got {storage!r}")
    group = text("turn_group", "turnserver")
    return TurnCertSettings(
        name=plan.main_name, storage=storage,
        issuer_dir=f"certificates/{issuer_key(s.acme_ca or DEFAULT_ACME_CA)}",
        conf=text("turnserver_conf", "/etc/turnserver.conf"),
        service=text("turn_service", "coturn.service"),
        group=group,
        min_days=days,
        managed=plan.managed,
        user=text("turn_user", group),
        turnserver_bin=text("turnserver_bin", "/usr/bin/turnserver"),
        plan=plan,
    )


# ---- pure renderings ---------------------------------------------------------------------


def sync_entries(t: TurnCertSettings) -> list[dict[str, str]]:
    """One entry per cdn name for the sync script and the path unit: Caddy's files, where the
    copies go, which unit to signal."""
    return [{"name": li.name, "src_crt": t.caddy_file(li.name, "crt"),
             "src_key": t.caddy_file(li.name, "key"), "src_meta": t.caddy_file(li.name, "json"),
             "dir": copy_dir(li), "unit": li.unit if li.instance else t.service}
            for li in t.listeners]


def unit_files(t: TurnCertSettings) -> dict[str, tuple[str, str]]:
    """node path -> (text, mode) of every unit and script this module installs."""
    values = {"entries": sync_entries(t), "tls_dir": TLS_DIR, "group": t.group,
              "turn_service": t.service, "script": SCRIPT, "service": SERVICE,
              "user": t.user, "turnserver_bin": t.turnserver_bin}
    files = {
        SCRIPT: (render.render("orama-turn-cert-sync.sh.j2", **values), "755"),
        UNITS[0]: (render.render("orama-turn-cert.service.j2", **values), "644"),
        UNITS[1]: (render.render("orama-turn-cert.path.j2", **values), "644"),
        UNITS[2]: (render.render("orama-turn-cert.timer.j2", **values), "644"),
    }
    if t.instances:
        files[INSTANCE_TEMPLATE] = (render.render("orama-turn-tls@.service.j2", **values), "644")
    return files


def original_conf(text: str) -> str:
    """The TURN server's config as it was before `managed_conf`."""
    out: list[str] = []
    inside = False
    for line in text.split("\n"):
        if line.startswith(BEGIN):
            inside = True
            continue
        if inside:
            inside = not line.startswith(END)
            continue
        out.append(line[len(MARK):] if line.startswith(MARK) else line)
    return "\n".join(out)


def managed_conf(text: str, relay: tuple[int, int] | None = None) -> str:
    """The config with its own cert=/pkey= lines (and min-port=/max-port= when `relay` gives
    the main server's share of the relay range) commented out and ours appended."""
    replaced = ("cert", "pkey", *(("min-port", "max-port") if relay else ()))
    out = []
    for line in original_conf(text).split("\n"):
        key = line.strip().lstrip("-").split("=", 1)[0].strip()
        out.append(MARK + line if key in replaced else line)
    body = "\n".join(out).rstrip("\n")
    ports = f"min-port={relay[0]}\nmax-port={relay[1]}\n" if relay else ""
    return f"{body}\n{BEGIN}\ncert={CERT}\npkey={KEY}\n{ports}{END}\n"


def node_confs(t: TurnCertSettings, current: str) -> dict[str, str]:
    """The main TURN server's managed config and every instance's, from the main config as
    it is on the node (the relay split comes from the operator's own range)."""
    own = original_conf(current)
    assert t.plan is not None
    if t.plan.slots:
        main_relay, slices = turnlisteners.split_relay(*turnlisteners.relay_range(own),
                                                       t.plan.slots)
    else:
        main_relay, slices = turnlisteners.relay_range(own), []
    confs = {t.conf: managed_conf(current, main_relay if t.plan.slots else None)}
    for li in t.instances:
        d = copy_dir(li)
        # The slot's own slice: a name keeps it as long as it keeps its port.
        confs[instance_conf_path(li)] = turnlisteners.instance_conf(
            own, li, f"{d}/cert.pem", f"{d}/key.pem", slices[li.slot])
    return confs


# ---- facts ---------------------------------------------------------------------------------


@dataclass
class TurnCertState:
    texts: dict[str, str] = field(default_factory=dict)  # path -> text of files that exist
    src_sha: dict[str, str] = field(default_factory=dict)  # name -> Caddy's certificate
    dst_sha: dict[str, str] = field(default_factory=dict)  # name -> the TURN listener's copy
    path_active: bool = False
    tls_dir: bool = False
    instance_dirs: set[str] = field(default_factory=set)  # names with a dir under TLS_DIR
    units: dict[str, str] = field(default_factory=dict)  # orama-turn-tls@ unit -> ActiveState

    def installed(self) -> bool:
        return bool(self.tls_dir or self.units
                    or any(p in self.texts for p in (SCRIPT, INSTANCE_TEMPLATE, *UNITS))
                    or any(BEGIN in t for t in self.texts.values()))


class TurnCertFacts(FactBase[TurnCertState]):
    """The files this module manages, the TURN configs, every name's two certificates' hashes
    and the instances present on the node."""

    @staticmethod
    def default() -> TurnCertState:
        return TurnCertState()

    def command(self, conf: str, src_crts: str, dst_dirs: str = "") -> str:
        # src_crts: "name=path ..."; dst_dirs: "name=dir ..." (words: the paths hold no spaces).
        pairs = [w.split("=", 1) for w in src_crts.split()]
        dirs = dict(w.split("=", 1) for w in dst_dirs.split()) if dst_dirs else {}
        files = [conf, SCRIPT, INSTANCE_TEMPLATE, *UNITS,
                 *(f"{d}/turnserver.conf" for d in dirs.values() if d != TLS_DIR)]
        lines = []
        for path in files:
            q = shlex.quote(path)
            lines.append(f"[ -f {q} ] && echo file={q}=$(base64 -w0 {q})")
        for name, src in pairs:
            s = shlex.quote(src)
            dst = shlex.quote(f"{dirs.get(name, TLS_DIR)}/cert.pem")
            lines += [f"[ -f {s} ] && echo src={name}=$(sha256sum < {s} | cut -c1-64)",
                      f"[ -f {dst} ] && echo dst={name}=$(sha256sum < {dst} | cut -c1-64)"]
        lines += [
            f"[ -d {TLS_DIR} ] && echo tls_dir=yes",
            f"for d in {TLS_DIR}/*/; do [ -d \"$d\" ] && echo instance_dir=$(basename \"$d\"); "
            "done",
            "systemctl list-units --all --plain --no-legend 'orama-turn-tls@*' 2>/dev/null"
            " | awk '{print \"unit=\" $1 \"=\" $3}'",
            f"echo path=$(systemctl is-active {PATH_UNIT} 2>/dev/null)",
            "true",
        ]
        return "\n".join(lines)

    def process(self, output: list[str]) -> TurnCertState:
        st = TurnCertState()
        for line in output:
            key, _, value = line.partition("=")
            if key == "file":
                # Paths hold no '=' here, base64 may end in '=': split at the first one.
                path, _, b64 = value.partition("=")
                st.texts[path] = base64.b64decode(b64).decode("utf-8", "replace")
            elif key in ("src", "dst"):
                name, _, sha = value.partition("=")
                if sha:
                    (st.src_sha if key == "src" else st.dst_sha)[name] = sha
            elif key == "tls_dir":
                st.tls_dir = True
            elif key == "instance_dir" and value and not value.startswith("."):
                st.instance_dirs.add(value)
            elif key == "unit":
                unit, _, active = value.partition("=")
                st.units[unit] = active
            elif key == "path":
                st.path_active = value == "active"
        return st


# ---- operations -----------------------------------------------------------------------------


def _fail(state: Any, host: Any, message: str) -> bool:
    # pyinfra passes (state, host) only to callbacks whose parameters carry these names.
    del state
    host.log_styled(message, fg="red", log_func=logger.error)
    return False


def _settings() -> tuple[NodeSettings, TurnCertSettings]:
    from orama_stealth.deploy.settings import settings_from_data

    s = settings_from_data(host.name, host.data)
    return s, turn_cert_settings(s, host.data, held_ports())


def _state(t: TurnCertSettings) -> TurnCertState:
    srcs = " ".join(f"{n}={t.caddy_file(n, 'crt')}" for n in t.names())
    dirs = " ".join(f"{li.name}={copy_dir(li)}" for li in t.listeners)
    st: TurnCertState = host.get_fact(TurnCertFacts, conf=t.conf, src_crts=srcs,
                                      dst_dirs=dirs, _timeout=FACT_TIMEOUT)
    return st


def _wait_listening(t: TurnCertSettings) -> str:
    # The TLS port from the config; the cutover's probes need it back before they run.
    return (f"port=$(sed -n 's/^[[:space:]]*-*tls-listening-port=\\([0-9]*\\).*/\\1/p' "
            f"{shlex.quote(t.conf)} | tail -n1); port=${{port:-5349}}; "
            "for i in $(seq 100); do ss -ltnH \"sport = :$port\" | grep -q . && break; "
            "sleep 0.1; done")


def _wait_port(li: Listener) -> str:
    return (f"for i in $(seq {LISTEN_WAIT * 10}); do ss -ltnH 'sport = :{li.port}' | grep -q . "
            f"&& break; sleep 0.1; done; ss -ltnH 'sport = :{li.port}' | grep -q . || "
            f"{{ echo '{li.unit} does not listen on :{li.port} after {LISTEN_WAIT}s "
            f"(journalctl -u {li.unit})' >&2; exit 1; }}")


def _remove_instances(names: list[str]) -> list[str]:
    """Shell steps stopping, disabling and deleting the instances for `names`."""
    steps = []
    for name in names:
        unit = shlex.quote(f"orama-turn-tls@{name}.service")
        steps += [f"systemctl disable --now {unit} 2>/dev/null || true",
                  f"systemctl reset-failed {unit} 2>/dev/null || true",
                  f"rm -rf {shlex.quote(f'{TLS_DIR}/{name}')}"]
    return steps


@operation()
def turn_certificate() -> Commands:
    """tls_mode acme: every cdn name's TURN TLS listener serves Caddy's certificate for that
    name (the main TURN server for `turn_cert_name`, an orama-turn-tls@ instance for each
    other), and every renewal reaches it by SIGUSR2 (path unit + hourly timer)."""
    _, t = _settings()
    if not t.managed:
        host.noop("the TURN server keeps the certificate the operator gave it (tls_mode files "
                  "or turn_cert_from_caddy: false)")
        return
    st = _state(t)
    current = st.texts.get(t.conf)
    if current is None:
        yield FunctionCommand(_fail, (f"turn certificate: {t.conf} (turnserver_conf) does not "
                                      "exist on the node",), {})
        return
    try:
        confs = node_confs(t, current)
    except SettingsError as exc:
        yield FunctionCommand(_fail, (f"turn certificate: {exc}",), {})
        return
    units_changed = False
    for path, (text, mode) in unit_files(t).items():
        if st.texts.get(path) != text:
            units_changed = True
            yield from put(path, text=text, mode=mode)
    new_conf = confs.pop(t.conf)
    conf_changed = new_conf != current
    if conf_changed:
        yield from put(f"{TLS_DIR}.conf.new", text=new_conf, mode="600")
    # An instance restarts only when its own config changed: a new name leaves the others be.
    restart = []
    for li in t.instances:
        path = instance_conf_path(li)
        if st.texts.get(path) != confs[path]:
            restart.append(li)
            yield from put(f"{path}.new", text=confs[path], mode="600")
    start = [li for li in t.instances
             if li not in restart and st.units.get(li.unit) != "active"]
    stale = sorted((st.instance_dirs | {u[len("orama-turn-tls@"):-len(".service")]
                                        for u in st.units})
                   - {li.name for li in t.instances})
    names = t.names()
    in_sync = all(st.src_sha.get(n) and st.src_sha.get(n) == st.dst_sha.get(n) for n in names)
    if not (units_changed or conf_changed or restart or start or stale or not st.path_active
            or not in_sync):
        host.noop(f"every TURN listener serves Caddy's certificate for its name "
                  f"({', '.join(names)})")
        return
    steps = ["systemctl daemon-reload", *_remove_instances(stale)]
    for name in names:
        src = shlex.quote(t.caddy_file(name, "crt"))
        # After the switch Caddy may still be obtaining a new name's certificate through the
        # router; the waits share one bound.
        steps += [f"while [ ! -s {src} ] && [ $(( $(date +%s) - t0 )) -lt {CERT_WAIT} ]; do "
                  "sleep 0.5; done",
                  f"[ -s {src} ] || {{ echo 'Caddy has no certificate for {name} at '{src}' "
                  f"after {CERT_WAIT}s (journalctl -u caddy)' >&2; exit 1; }}"]
    steps.insert(0, "t0=$(date +%s)")
    for li in restart:
        path = shlex.quote(instance_conf_path(li))
        steps += [f"install -d -o root -g {t.group} -m 0750 {TLS_DIR} {copy_dir(li)}",
                  f"mv -f {path}.new {path}", f"chown root:{t.group} {path}",
                  f"chmod 0640 {path}"]
    # The copies exist before a listener needing them starts; running ones get SIGUSR2.
    steps.append(f"systemctl start {SERVICE}")
    steps.append(f"systemctl enable --now {PATH_UNIT} {TIMER}")
    if units_changed:
        # A path unit reads its PathChanged= lines at start: a new name needs a restart.
        steps.append(f"systemctl restart {PATH_UNIT}")
    if conf_changed:
        conf = shlex.quote(t.conf)
        # cat keeps the file's owner and mode; coturn reads cert=/pkey= paths and its relay
        # range only at start. Restarted before the instances start on their relay slices.
        steps += [f"cat {TLS_DIR}.conf.new > {conf}", f"rm -f {TLS_DIR}.conf.new",
                  f"systemctl restart {t.service}", _wait_listening(t)]
    for li in (*restart, *start):
        unit = shlex.quote(li.unit)
        steps += [f"systemctl enable -q {unit}",
                  f"systemctl {'restart' if li in restart else 'start'} {unit}", _wait_port(li)]
    yield sh(" && ".join(steps), timeout=COMMAND_TIMEOUT + CERT_WAIT)


def _rollback_steps(t: TurnCertSettings, st: TurnCertState,
                    staged: str) -> tuple[str | None, list[str]]:
    """(the TURN server's own config to put at `staged` first, or None; the shell steps)."""
    current = st.texts.get(t.conf)
    names = sorted(st.instance_dirs | {u[len("orama-turn-tls@"):-len(".service")]
                                       for u in st.units} | {li.name for li in t.instances})
    steps = [f"systemctl disable --now {PATH_UNIT} {TIMER} 2>/dev/null || true",
             *_remove_instances(names),
             f"rm -f {' '.join(UNITS)} {INSTANCE_TEMPLATE} {SCRIPT}", "systemctl daemon-reload",
             f"systemctl reset-failed {SERVICE} 2>/dev/null || true"]
    if current is not None and original_conf(current) != current:
        steps += [f"cat {staged} > {shlex.quote(t.conf)}", f"rm -f {staged}",
                  f"rm -rf {TLS_DIR}", f"systemctl restart {t.service}", _wait_listening(t)]
        return original_conf(current), steps
    steps.append(f"rm -rf {TLS_DIR}")
    return None, steps


@operation()
def turn_certificate_rollback() -> Commands:
    """Stop and remove the instances, the units, the script and the copies; give the TURN
    server its own files and relay range back."""
    _, t = _settings()
    st = _state(t)
    if not st.installed():
        host.noop("no TURN certificate management installed")
        return
    staged = f"{TLS_DIR}.conf.orig"
    text, steps = _rollback_steps(t, st, staged)
    if text is not None:
        yield from put(staged, text=text, mode="600")
    yield sh(" && ".join(steps))


def rollback_now() -> tuple[bool, str]:
    """The same removal, run at once: for the verify step, whose rollback comes after this
    module's listeners were set up in the same run."""
    from orama_stealth.deploy.ops.common import run, stage

    _, t = _settings()
    st = _state(t)
    if not st.installed():
        return True, "no TURN certificate management installed"
    staged = f"{TLS_DIR}.conf.orig"
    text, steps = _rollback_steps(t, st, staged)
    if text is not None:
        staged_now = stage(text, "turnserver.conf.orig")
        steps = [f"mv -f {staged_now} {staged}", *steps]
    return run(" && ".join(steps))
