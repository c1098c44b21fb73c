"""The daemon's listener addresses, its start-up line and the -bh argument."""

from __future__ import annotations

import unittest

from twisted_mta.config import parse_config_text
from twisted_mta.hostcheck import HostCheckError, parse_host_argument
from twisted_mta.service import describe_listeners, listening_addresses


def _config(text: str):
    return parse_config_text(text)


class ListeningAddressTests(unittest.TestCase):
    def test_ports_times_interfaces(self) -> None:
        config = _config("daemon_smtp_ports = 25 : 587\nlocal_interfaces = <; 127.0.0.1 ; ::1\n")
        self.assertEqual(listening_addresses(config),
                         [("127.0.0.1", 25), ("127.0.0.1", 587), ("::1", 25), ("::1", 587)])

    def test_interface_with_own_port(self) -> None:
        config = _config("daemon_smtp_ports = 25\n"
                         "local_interfaces = <; 127.0.0.1.2525 ; [::1]:26 ; 127.0.0.2\n")
        self.assertEqual(listening_addresses(config),
                         [("127.0.0.1", 2525), ("::1", 26), ("127.0.0.2", 25)])

    def test_service_names(self) -> None:
        config = _config("daemon_smtp_ports = smtp : submission\nlocal_interfaces = 127.0.0.1\n")
        self.assertEqual(listening_addresses(config), [("127.0.0.1", 25), ("127.0.0.1", 587)])

    def test_override_ports_and_interfaces(self) -> None:
        config = _config("daemon_smtp_ports = 25\nlocal_interfaces = 127.0.0.1\n")
        self.assertEqual(listening_addresses(config, "2525"), [("127.0.0.1", 2525)])
        self.assertEqual(listening_addresses(config, "<; 127.0.0.3.40"), [("127.0.0.3", 40)])

    def test_defaults_listen_everywhere(self) -> None:
        self.assertEqual(listening_addresses(_config("")), [("::0", 25), ("0.0.0.0", 25)])

    def test_bad_interface(self) -> None:
        config = _config("local_interfaces = not-an-address\n")
        with self.assertRaises(ValueError):
            listening_addresses(config)


class HostArgumentTests(unittest.TestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_host_argument("192.0.2.1"), ("192.0.2.1", 0))
        self.assertEqual(parse_host_argument("192.0.2.1.1234"), ("192.0.2.1", 1234))
        self.assertEqual(parse_host_argument("2001:db8::1"), ("2001:db8::1", 0))
        self.assertEqual(parse_host_argument("2001:db8::1.25"), ("2001:db8::1", 25))

    def test_bad(self) -> None:
        with self.assertRaises(HostCheckError):
            parse_host_argument("nonsense")


class StartupLineTests(unittest.TestCase):
    """The "listening for ..." text, as Exim 4.96's daemon.c builds it."""

    def test_ports_of_one_address_merged_and_smtps_last(self) -> None:
        self.assertEqual(
            describe_listeners([("127.0.0.1", 2525, False), ("127.0.0.1", 2587, False),
                                ("127.0.0.1", 2465, True), ("::1", 2525, False)]),
            "SMTP on [127.0.0.1]:{2525,2587} [::1]:2525 and for SMTPS on [127.0.0.1]:2465")

    def test_wildcards(self) -> None:
        self.assertEqual(describe_listeners([("0.0.0.0", 25, False), ("::0", 25, False)]),
                         "SMTP on port 25 (IPv6 and IPv4)")
        self.assertEqual(describe_listeners([("::", 25, False)]),
                         "SMTP on port 25 (IPv6 with IPv4)")
        self.assertEqual(describe_listeners([("0.0.0.0", 25, False)]),
                         "SMTP on port 25 (IPv4)")

    def test_only_smtps(self) -> None:
        self.assertEqual(describe_listeners([("127.0.0.1", 465, True)]),
                         "SMTPS on [127.0.0.1]:465")

    def test_at_most_ten_named(self) -> None:
        text = describe_listeners([("127.0.0.1", 2000 + n, False) for n in range(12)])
        self.assertTrue(text.endswith("2009} ..."), text)
