"""The twistd plugin ``exim-py`` is found and builds its service."""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial import unittest

import twisted.plugins


def find_plugin():
    for plugin in getPlugins(IServiceMaker, twisted.plugins):
        if plugin.tapname == "exim-py":
            return plugin
    return None


class PluginTests(unittest.TestCase):
    def test_discovered(self) -> None:
        plugin = find_plugin()
        self.assertIsNotNone(plugin, "twistd cannot see the exim-py plugin")

    def test_service_carries_configuration(self) -> None:
        plugin = find_plugin()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("primary_hostname = plugin.example\nSTAMP = yes\n")
        options = plugin.options()
        options.parseOptions(["-C", path, "-D", "STAMP=no"])
        service = plugin.makeService(options)
        self.assertEqual(service.config.get("primary_hostname"), "plugin.example")
        self.assertEqual(service.config.macros["STAMP"], "no")

    def test_bad_configuration_exits(self) -> None:
        plugin = find_plugin()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("no_such_option = 1\n")
        options = plugin.options()
        options.parseOptions(["-C", path])
        self.assertRaises(SystemExit, plugin.makeService, options)
