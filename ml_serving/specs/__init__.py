"""Pure builders: settings (and resolved versions) in, Kubernetes object dicts out. No Pulumi in here."""
