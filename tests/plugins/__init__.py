"""Tests of the example plugins, written with runner.testing: models for plugin authors."""
