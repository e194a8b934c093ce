"""`python -m` entry points beside the CLI: the digits teacher's quality measurement and the
training of the digits classifier it is measured with."""
