"""The Typer app: parsing, validation, config resolution, summaries. No math lives here."""
