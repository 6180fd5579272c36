"""The CustomResourceDefinition, shipped as package data so the CLI validates against the same file."""
