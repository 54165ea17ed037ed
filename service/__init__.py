"""convnext-serve serving side: the Ray Serve application, its data plane, runtime and CLI."""
