"""Reports rendered from result data (benchmark JSON lines -> Markdown + PNG)."""
