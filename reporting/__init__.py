"""What risk officers and reviewers read: the risk report, the strategy report, the model card and their
self-contained HTML pages and charts."""
