"""Headway client package: the generated stubs today, an ergonomic client later."""
