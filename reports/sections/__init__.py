"""One module per report section: `build(site) -> Section | None`."""
