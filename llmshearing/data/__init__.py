"""Data: MDS preparation from JSON-lines text, and the multi-domain datasets read in training.

Submodules are imported on use (``llmshearing.data.prepare`` and friends) so that importing the
package stays cheap.
"""
