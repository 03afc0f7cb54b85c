from evomerge.cli import entry

entry()
