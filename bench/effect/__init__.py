"""The parts of bench/ddil_effect.py: paired statistics (`stats`), the suites and each method's
arms as data (`suites`), running and caching one arm (`runner`), the markdown report and heat
map (`report`) and the wall-clock overhead measurement (`timing`)."""
