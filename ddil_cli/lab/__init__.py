"""The embedded image lab: tiny pixel-space teachers and the digits classifier."""
