"""Where each Helm release's chart is fetched from (`ml-serving:charts`): the one place that reads a chart folder.

An air-gapped cluster installs from a folder of unpacked charts or a mirror the team runs; the versions stay the
ones the stack pins, and a folder whose `Chart.yaml` says otherwise is refused before anything is declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ml_serving.settings import Settings
from ml_serving.specs.charts import Release
from ml_serving.specs.platform import HelmChart


class ChartSourceError(ValueError):
    """A chart the stack pins is missing from `charts.folder`, or there at another version."""


@dataclass(frozen=True)
class ChartSource:
    """What a Helm release is given: a chart name (with a repository), an `oci://` reference, or a folder."""

    chart: str
    version: str
    repository: str | None = None


def candidates(folder: Path, chart: HelmChart) -> list[Path]:
    """The folders a chart may sit in: `<chart>-<version>` (as `helm pull --untar` into per-version folders) or
    `<chart>` (as plain `helm pull --untar`)."""
    return [folder / f"{chart.chart}-{chart.version}", folder / chart.chart]


def locate(settings: Settings, chart: HelmChart, base: Path) -> ChartSource:
    """The source of `chart` under `settings.charts`; a relative folder is relative to `base` (the project)."""
    charts = settings.charts
    if charts.folder:
        return _from_folder((base / charts.folder).resolve(), chart, charts.devel_builds.get(chart.chart))
    if charts.mirror and charts.mirror.startswith("oci://"):
        return ChartSource(f"{charts.mirror.rstrip('/')}/{chart.chart}", chart.version)
    if charts.mirror:
        return ChartSource(chart.chart, chart.version, charts.mirror)
    return public(chart)


def public(chart: HelmChart) -> ChartSource:
    return ChartSource(chart.chart, chart.version, chart.repository)


def _from_folder(folder: Path, chart: HelmChart, devel: str | None = None) -> ChartSource:
    """The chart's folder if its Chart.yaml says the pinned version, or exactly the development version `devel`
    (`charts.develBuilds`) that the team accepted for it."""
    where = "ml-serving:charts.folder"
    fetch = f"helm pull {chart.repository.rstrip('/')}/{chart.chart} --version {chart.version} --untar"
    if chart.repository.startswith("https://"):
        fetch = f"helm pull {chart.chart} --repo {chart.repository} --version {chart.version} --untar"
    found = next((path for path in candidates(folder, chart) if (path / "Chart.yaml").is_file()), None)
    if found is None:
        tried = " or ".join(str(path) for path in candidates(folder, chart))
        raise ChartSourceError(
            f"{where}: no chart {chart.chart} at {tried} (no Chart.yaml): unpack it there "
            f"(`{fetch} --untardir {folder}`), or unset charts.folder to use the public repository"
        )
    try:
        meta = yaml.safe_load((found / "Chart.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise ChartSourceError(f"{where}: {found / 'Chart.yaml'} is not valid YAML ({exc})") from None
    name, version = str(meta.get("name", "")), str(meta.get("version", ""))
    if name != chart.chart:
        raise ChartSourceError(
            f"{where}: {found / 'Chart.yaml'} is the chart {name!r}, not {chart.chart!r}: put {chart.chart} "
            f"{chart.version} there"
        )
    pinned = version.removeprefix("v") == chart.version.removeprefix("v")
    if devel is not None and pinned:
        raise ChartSourceError(
            f"ml-serving:charts.develBuilds.{chart.chart}: {found / 'Chart.yaml'} says the pinned version {version}, "
            f"not a development build: remove the entry"
        )
    if not pinned and (devel is None or version != devel):
        says = f"{found / 'Chart.yaml'} says version {version}"
        fix = f"put {chart.chart} {chart.version} there (`{fetch}`), or change the pin in a reviewed diff"
        if devel is not None:
            says += f", not the {devel} that charts.develBuilds accepts"
        elif _is_devel(version):
            app = meta.get("appVersion")
            says += f" (appVersion {app})" if app else ""
            says += ": a development build (the chart's source tree, not the published chart)"
            fix = (
                f"put the published {chart.chart} {chart.version} there (`{fetch}`), or, if that folder is the "
                f"source at tag {chart.version}, accept it with charts.develBuilds: {{{chart.chart}: {version}}}"
            )
        raise ChartSourceError(f"{where}: the stack pins {chart.chart} {chart.version}, but {says}: {fix}")
    return ChartSource(str(found), chart.version)  # Helm ignores a local chart's version; the plan shows it


def _is_devel(version: str) -> bool:
    """A semver pre-release (`v1.0.0-devel`), as a chart's source tree says between releases."""
    return "-" in version


def sources(settings: Settings, releases: list[Release], base: Path) -> dict[str, ChartSource]:
    """Every release's source by release name; raises ChartSourceError listing every bad chart at once."""
    found, problems = {}, []
    installed = {release.chart.chart for release in releases}
    for name in sorted(set(settings.charts.devel_builds) - installed):
        problems.append(
            f"ml-serving:charts.develBuilds.{name}: the stack installs no chart {name} (it installs "
            f"{', '.join(sorted(installed)) or 'none'}): remove the entry"
        )
    for release in releases:
        try:
            found[release.chart.release] = locate(settings, release.chart, base)
        except ChartSourceError as exc:
            problems.append(str(exc))
    if problems:
        raise ChartSourceError("\n".join(problems))
    return found
