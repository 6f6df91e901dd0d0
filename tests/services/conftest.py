"""Where the browser tests left their screenshots (test artifacts), said at the end of the run."""


def pytest_terminal_summary(terminalreporter):
    from tests.services.browser import SAVED

    if SAVED:
        terminalreporter.write_sep("-", "labeling page screenshots (test artifacts)")
        terminalreporter.write_line(str(SAVED[0].parent))
        for p in SAVED:
            terminalreporter.write_line(f"  {p.name}")
