"""Traces, metrics and logs. Configured once, from the CLI; nothing else imports the SDKs' globals."""
