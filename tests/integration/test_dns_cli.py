"""`letterbox dns records DOMAIN` prints the wizard's table; `letterbox dns check DOMAIN` runs its checks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import trustme

from appliance.config import DataLayout
from tests.conftest import LETTERBOX, ServedBox, preset_settings
from tests.support.dns_server import ZoneServer

DOMAIN, HOST = "example.test", "mail.example.test"


def letterbox(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LETTERBOX, "--data", str(data), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LETTERBOX_DATA": ""})


def test_records_and_check(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert letterbox(data, "domain", "add", DOMAIN).returncode == 0
    with ZoneServer({(DOMAIN, "MX"): [f"10 {HOST}."]}) as zone:
        preset_settings(DataLayout(data), {"dns_resolver": zone.address, "public_ipv4": "198.51.100.7",
                                           "hostname": HOST})
        records = letterbox(data, "dns", "records", DOMAIN)
        assert records.returncode == 0, records.stderr
        lines = records.stdout.splitlines()
        assert lines[0].split() == ["TYPE", "NAME", "VALUE"]
        assert lines[1].split() == ["MX", DOMAIN, "10", f"{HOST}."]
        assert any(line.split()[:3] == ["A", HOST, "198.51.100.7"] for line in lines)
        dkim = next(line for line in lines if "._domainkey." in line)
        assert "v=DKIM1; k=rsa; p=" in dkim
        again = letterbox(data, "dns", "records", DOMAIN)
        assert next(line for line in again.stdout.splitlines() if "._domainkey." in line) == dkim  # one key

        check = letterbox(data, "dns", "check", DOMAIN)
        assert check.returncode == 1
        assert check.stdout.splitlines()[0].split() == ["FOUND", "MX", DOMAIN]
        assert "MISSING  TXT" in check.stdout
        assert "records are not right yet" in check.stderr

        for name, rdtype, values in (
            (HOST, "A", ["198.51.100.7"]), (DOMAIN, "TXT", ['"v=spf1 mx -all"']),
            (f"_dmarc.{DOMAIN}", "TXT", ['"v=DMARC1; p=quarantine"']),
            (f"autoconfig.{DOMAIN}", "CNAME", [f"{HOST}."]), (f"autodiscover.{DOMAIN}", "CNAME", [f"{HOST}."]),
            (f"_submission._tcp.{DOMAIN}", "SRV", [f"0 1 587 {HOST}."]),
            (f"_imaps._tcp.{DOMAIN}", "SRV", [f"0 1 993 {HOST}."]),
            (f"_pop3s._tcp.{DOMAIN}", "SRV", [f"0 1 995 {HOST}."]),
            ("7.100.51.198.in-addr.arpa", "PTR", [f"{HOST}."]),
        ):
            zone.set(name, rdtype, values)
        value = dkim.split(None, 2)[2]
        zone.set(dkim.split()[1], "TXT", [f'"{value[:200]}" "{value[200:]}"'])
        check = letterbox(data, "dns", "check", DOMAIN)
        assert check.returncode == 0, check.stdout + check.stderr
        assert {line.split()[0] for line in check.stdout.splitlines()} == {"FOUND"}


def test_unknown_domain_is_one_clear_line(tmp_path: Path) -> None:
    assert letterbox(tmp_path / "data", "domain", "add", "example.org").returncode == 0  # a box, without that domain
    result = letterbox(tmp_path / "data", "dns", "records", "nowhere.example")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "letterbox: nowhere.example is not a domain of this box (letterbox domain add)")


def test_the_cli_names_the_ports_the_served_box_publishes(tmp_path: Path, ca: trustme.CA) -> None:
    """A box served with --port-offset (`make run`'s 10000) names standard + offset in the console's SRV
    records; `letterbox dns records|zone` named 587, 993 and 995, and `letterbox dns check` called the
    records the console asks for wrong (and kept that verdict for the console's page)."""
    box = ServedBox(tmp_path, ca)
    box.start()
    try:
        box.cli("domain", "add", DOMAIN)
        with ZoneServer({}) as zone:
            preset_settings(box.data, {"dns_resolver": zone.address, "hostname": HOST})
            ports = {service: box.port(service) for service in ("submission", "imaps", "pop3s")}
            assert ports["imaps"] != 993
            records = box.cli("dns", "records", DOMAIN).stdout.splitlines()
            srv = {line.split()[1]: line.split(None, 2)[2] for line in records if line.startswith("SRV ")}
            assert srv == {f"_{service}._tcp.{DOMAIN}": f"0 1 {port} {HOST}." for service, port in ports.items()}
            text = box.cli("dns", "zone", DOMAIN).stdout
            assert all(f"SRV   0 1 {port} {HOST}." in text for port in ports.values()), text
            for name, value in srv.items():
                zone.set(name, "SRV", [value])
            check = box.cli("dns", "check", DOMAIN, check=False).stdout
            assert [line.split()[0] for line in check.splitlines() if " SRV " in line] == ["FOUND"] * 3, check
    finally:
        box.stop()
