"""The TURN server serves the certificate Caddy holds for the stealth name (tls_mode acme).

Caddy keeps its keys readable by its own user only (0600 in 0700 directories) and rewrites
them on every renewal, so the TURN server cannot simply be pointed at them. A oneshot unit
copies Caddy's certificate and key for the name to `/etc/orama/turn-tls/` (root:<TURN group>,
0640) and sends the running TURN server SIGUSR2, which makes coturn reload certificate and key
without dropping allocations. A path unit runs it whenever Caddy's files for the name change,
an hourly timer catches anything the path unit missed. Caddy 2.6 has no event hook that could
run a command (that needs a plugin), hence systemd.

coturn has one certificate (no SNI selection) and Caddy obtains one per name, so the TURN
server can be right for one stealth name only: `turn_cert_name` (default the first cdn name).
The certificate truth check reports every other name as serving the wrong certificate.

Rollback removes the units, the script and the copies, restores the TURN server's own
`cert=`/`pkey=` lines and restarts it (it only reads those paths at start).
"""

from __future__ import annotations

import base64
import logging
import shlex
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pyinfra.api.command import FunctionCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host

from orama_stealth.deploy import render
from orama_stealth.deploy.ops.common import COMMAND_TIMEOUT, FACT_TIMEOUT, put, sh
from orama_stealth.deploy.settings import HostDataLike, NodeSettings, SettingsError

Commands = Generator[Any, None, None]
logger = logging.getLogger("orama_stealth.deploy")

TLS_DIR = "/etc/orama/turn-tls"
CERT = f"{TLS_DIR}/cert.pem"
KEY = f"{TLS_DIR}/key.pem"
SCRIPT = "/usr/local/lib/orama-stealth/turn-cert-sync"
SERVICE = "orama-turn-cert.service"
PATH_UNIT = "orama-turn-cert.path"
TIMER = "orama-turn-cert.timer"
UNIT_DIR = "/etc/systemd/system"
UNITS = tuple(f"{UNIT_DIR}/{u}" for u in (SERVICE, PATH_UNIT, TIMER))
DEFAULT_ACME_CA = "https://acme-v02.api.letsencrypt.org/directory"  # Caddy's default
DEFAULT_STORAGE = "/var/lib/caddy/.local/share/caddy"  # Debian's caddy.service (HOME)
CERT_WAIT = 120  # seconds for Caddy to obtain a missing certificate through the router
MARK = "#orama-stealth# "
BEGIN = "# >>> orama-stealth managed: TURN TLS certificate from Caddy (removed by rollback)"
END = "# <<< orama-stealth managed"


@dataclass(frozen=True, slots=True)
class TurnCertSettings:
    name: str  # the stealth name whose certificate the TURN server serves
    storage: str  # Caddy's storage directory on the node
    issuer_dir: str  # certificates/<issuer key> under it
    conf: str  # the TURN server's config file
    service: str  # its systemd unit
    group: str  # its group: may read the copies
    min_days: float  # certificate truth fails below this
    managed: bool  # the deploy gives the TURN server Caddy's certificate for `name`

    def caddy_file(self, name: str, ext: str) -> str:
        return f"{self.storage}/{self.issuer_dir}/{name}/{name}.{ext}"


def issuer_key(directory: str) -> str:
    """certmagic's storage key of an ACME directory: host (':' -> '-') and path ('/' -> '-')."""
    url = urlsplit(directory)
    key = url.netloc
    path = url.path.replace("\\", "-").replace("/", "-").strip("-")
    if path:
        key += "-" + path
    return key.lower().replace(":", "-")


def turn_cert_settings(s: NodeSettings, data: HostDataLike) -> TurnCertSettings:
    def text(key: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
            raise SettingsError(f"host {s.host}: {key}: expected a non-empty word, got {value!r}")
        return value.strip()

    name = text("turn_cert_name", s.cdn_hosts[0]).lower().rstrip(".")
    if name not in s.cdn_hosts:
        raise SettingsError(f"host {s.host}: turn_cert_name: {name!r} is not one of the cdn "
                            f"names {list(s.cdn_hosts)}")
    raw_days = data.get("cert_min_days", 14)
    try:
        days = float(raw_days)
    except (TypeError, ValueError):
        days = -1.0
    if days < 0:
        raise SettingsError(f"host {s.host}: cert_min_days: expected a number of days >= 0, "
                            f"got {raw_days!r}")
    from_caddy = data.get("turn_cert_from_caddy", True)
    if not isinstance(from_caddy, bool):
        raise SettingsError(f"host {s.host}: turn_cert_from_caddy: expected true or false, got "
                            f"{from_caddy!r}")
    storage = text("caddy_storage", DEFAULT_STORAGE).rstrip("/")
    if not storage.startswith("/"):
        raise SettingsError(f"host {s.host}: caddy_storage: expected an absolute path on the "
                            f"node, got {storage!r}")
    return TurnCertSettings(
        name=name, storage=storage,
        issuer_dir=f"certificates/{issuer_key(s.acme_ca or DEFAULT_ACME_CA)}",
        conf=text("turnserver_conf", "/etc/turnserver.conf"),
        service=text("turn_service", "coturn.service"),
        group=text("turn_group", "turnserver"),
        min_days=days,
        managed=s.tls_mode == "acme" and from_caddy,
    )


# ---- pure renderings ---------------------------------------------------------------------


def unit_files(t: TurnCertSettings) -> dict[str, tuple[str, str]]:
    """node path -> (text, mode) of everything this module installs."""
    values = {"name": t.name, "src_crt": t.caddy_file(t.name, "crt"),
              "src_key": t.caddy_file(t.name, "key"), "src_meta": t.caddy_file(t.name, "json"),
              "tls_dir": TLS_DIR, "group": t.group, "turn_service": t.service,
              "script": SCRIPT, "service": SERVICE}
    return {
        SCRIPT: (render.render("orama-turn-cert-sync.sh.j2", **values), "755"),
        UNITS[0]: (render.render("orama-turn-cert.service.j2", **values), "644"),
        UNITS[1]: (render.render("orama-turn-cert.path.j2", **values), "644"),
        UNITS[2]: (render.render("orama-turn-cert.timer.j2", **values), "644"),
    }


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


def managed_conf(text: str) -> str:
    """The config with its own cert=/pkey= lines commented out and ours appended."""
    out = []
    for line in original_conf(text).split("\n"):
        key = line.strip().lstrip("-").split("=", 1)[0].strip()
        out.append(MARK + line if key in ("cert", "pkey") else line)
    body = "\n".join(out).rstrip("\n")
    return f"{body}\n{BEGIN}\ncert={CERT}\npkey={KEY}\n{END}\n"


# ---- facts ---------------------------------------------------------------------------------


@dataclass
class TurnCertState:
    texts: dict[str, str] = field(default_factory=dict)  # path -> text of files that exist
    src_sha: str | None = None  # Caddy's certificate for the name
    dst_sha: str | None = None  # the TURN server's copy
    path_active: bool = False
    tls_dir: bool = False

    def installed(self) -> bool:
        return bool(self.tls_dir or any(p in self.texts for p in (SCRIPT, *UNITS))
                    or any(BEGIN in t for t in self.texts.values()))


class TurnCertFacts(FactBase[TurnCertState]):
    """The files this module manages, the TURN config, and both certificates' hashes."""

    @staticmethod
    def default() -> TurnCertState:
        return TurnCertState()

    def command(self, conf: str, src_crt: str) -> str:
        lines = []
        for path in (conf, SCRIPT, *UNITS):
            q = shlex.quote(path)
            lines.append(f"[ -f {q} ] && echo file={q}=$(base64 -w0 {q})")
        src = shlex.quote(src_crt)
        lines += [
            f"[ -f {src} ] && echo src=$(sha256sum < {src} | cut -c1-64)",
            f"[ -f {CERT} ] && echo dst=$(sha256sum < {CERT} | cut -c1-64)",
            f"[ -d {TLS_DIR} ] && echo tls_dir=yes",
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
            elif key == "src":
                st.src_sha = value or None
            elif key == "dst":
                st.dst_sha = value or None
            elif key == "tls_dir":
                st.tls_dir = True
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
    return s, turn_cert_settings(s, host.data)


def _state(t: TurnCertSettings) -> TurnCertState:
    st: TurnCertState = host.get_fact(TurnCertFacts, conf=t.conf,
                                      src_crt=t.caddy_file(t.name, "crt"),
                                      _timeout=FACT_TIMEOUT)
    return st


def _wait_listening(t: TurnCertSettings) -> str:
    # The TLS port from the config; the cutover's probes need it back before they run.
    return (f"port=$(sed -n 's/^[[:space:]]*-*tls-listening-port=\\([0-9]*\\).*/\\1/p' "
            f"{shlex.quote(t.conf)} | tail -n1); port=${{port:-5349}}; "
            "for i in $(seq 100); do ss -ltnH \"sport = :$port\" | grep -q . && break; "
            "sleep 0.1; done")


@operation()
def turn_certificate() -> Commands:
    """tls_mode acme: the TURN server serves Caddy's certificate for `turn_cert_name`, and
    every renewal reaches it by SIGUSR2 (path unit + hourly timer)."""
    s, t = _settings()
    if not t.managed:
        host.noop("the TURN server keeps the certificate the operator gave it (tls_mode files "
                  "or turn_cert_from_caddy: false)")
        return
    others = [n for n in s.cdn_hosts if n != t.name]
    if others and host.state.is_executing:
        host.log_styled(f"turn certificate: coturn serves one certificate, Caddy's for {t.name}; "
                        f"it does not cover {', '.join(others)} (see docs/cutover.md)",
                        fg="yellow", log_func=logger.warning)
    st = _state(t)
    changed = False
    for path, (text, mode) in unit_files(t).items():
        if st.texts.get(path) != text:
            changed = True
            yield from put(path, text=text, mode=mode)
    current = st.texts.get(t.conf)
    if current is None:
        yield FunctionCommand(_fail, (f"turn certificate: {t.conf} (turnserver_conf) does not "
                                      "exist on the node",), {})
        return
    new_conf = managed_conf(current)
    conf_changed = new_conf != current
    if conf_changed:
        staged = f"{TLS_DIR}.conf.new"
        yield from put(staged, text=new_conf, mode="600")
    if not (changed or conf_changed or not st.path_active or st.src_sha != st.dst_sha):
        host.noop(f"the TURN server already serves Caddy's certificate for {t.name}")
        return
    src = shlex.quote(t.caddy_file(t.name, "crt"))
    steps = [
        "systemctl daemon-reload",
        # After the switch Caddy may still be obtaining the certificate through the router.
        f"for i in $(seq {CERT_WAIT * 2}); do [ -s {src} ] && break; sleep 0.5; done",
        f"[ -s {src} ] || {{ echo 'Caddy has no certificate for {t.name} at '{src}' after "
        f"{CERT_WAIT}s (journalctl -u caddy)' >&2; exit 1; }}",
        f"systemctl start {SERVICE}",
        f"systemctl enable --now {PATH_UNIT} {TIMER}",
    ]
    if conf_changed:
        conf = shlex.quote(t.conf)
        # cat keeps the file's owner and mode; coturn reads cert=/pkey= paths only at start.
        steps += [f"cat {TLS_DIR}.conf.new > {conf}", f"rm -f {TLS_DIR}.conf.new",
                  f"systemctl restart {t.service}", _wait_listening(t)]
    yield sh(" && ".join(steps), timeout=COMMAND_TIMEOUT + CERT_WAIT)


@operation()
def turn_certificate_rollback() -> Commands:
    """Remove the units, the script and the copies; give the TURN server its own files back."""
    _, t = _settings()
    st = _state(t)
    if not st.installed():
        host.noop("no TURN certificate management installed")
        return
    current = st.texts.get(t.conf)
    steps = [f"systemctl disable --now {PATH_UNIT} {TIMER} 2>/dev/null || true",
             f"rm -f {' '.join(UNITS)} {SCRIPT}", "systemctl daemon-reload",
             f"systemctl reset-failed {SERVICE} 2>/dev/null || true"]
    if current is not None and original_conf(current) != current:
        staged = f"{TLS_DIR}.conf.orig"
        yield from put(staged, text=original_conf(current), mode="600")
        steps += [f"cat {staged} > {shlex.quote(t.conf)}", f"rm -f {staged}",
                  f"rm -rf {TLS_DIR}", f"systemctl restart {t.service}", _wait_listening(t)]
    else:
        steps.append(f"rm -rf {TLS_DIR}")
    yield sh(" && ".join(steps))
