"""Host runtimes that execute exported artifacts without the target device (see ``coreml``)."""
