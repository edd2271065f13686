// Types the switchyard dashboards are checked against (deploy/grafana/validate.sh copies this file next to
// the installed @grafana/schema and type-checks every dashboard with `tsc --strict`).
//
// Two checks per dashboard, both on the JSON as an object literal (so excess-property checks apply):
//  1. Json<Dashboard>: Grafana's published Dashboard type, as is.
//  2. StrictDashboard: the same type with the loosely typed parts of a panel made exact: `options` and
//     `fieldConfig.defaults.custom` use the panel plugin's published types (timeseries, stat, table),
//     `targets` are Prometheus queries, and description, unit, datasource and targets are required.
//
// Json<T> is the only relaxation: @grafana/schema models many fields as TypeScript string enums
// (ThresholdsMode, FieldColorModeId, LegendDisplayMode, ...), and a JSON string is never assignable to a
// string enum. Json<T> replaces each such enum by the union of its values ("absolute" | "percentage"),
// which is exactly what the JSON model accepts; any other string still fails.

import type {
  DataQuery,
  DataSourceRef,
  Dashboard,
  FieldConfig,
  FieldConfigSource,
  Panel,
  RowPanel,
} from '@grafana/schema';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

/** A type as it appears in JSON: string enums become the union of their string values. */
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<unknown>
      ? { -readonly [K in keyof T]: Json<T[K]> } // arrays and tuples keep their shape
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

/**
 * A Prometheus query as Grafana stores it in `targets` (the Prometheus plugin's dataquery schema;
 * @grafana/schema does not publish it, so it is written out here from the plugin's schema).
 */
export interface PrometheusQuery extends DataQuery {
  expr: string;
  editorMode?: 'code' | 'builder';
  exemplar?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  instant?: boolean;
  interval?: string;
  intervalFactor?: number;
  legendFormat?: string;
  range?: boolean;
}

type StrictFieldConfig<TCustom> = Omit<FieldConfig, 'custom' | 'unit'> & {
  /** Every panel states its unit. */
  unit: string;
} & ([TCustom] extends [never] ? { custom?: never } : { custom: TCustom });

type StrictPanel<TType extends string, TOptions, TCustom> = Omit<
  Panel,
  'type' | 'options' | 'fieldConfig' | 'targets' | 'description' | 'datasource' | 'gridPos' | 'title' | 'id'
> & {
  type: TType;
  id: number;
  title: string;
  description: string;
  datasource: DataSourceRef;
  gridPos: NonNullable<Panel['gridPos']>;
  options: TOptions;
  fieldConfig: Omit<FieldConfigSource, 'defaults'> & { defaults: StrictFieldConfig<TCustom> };
  targets: [PrometheusQuery, ...PrometheusQuery[]];
};

export type SwitchyardPanel =
  | StrictPanel<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>
  | StrictPanel<'stat', Stat.Options, never>
  | StrictPanel<'table', Table.Options, Table.FieldConfig>;

type StrictDashboardShape = Omit<
  Dashboard,
  'panels' | 'uid' | 'title' | 'editable' | 'time' | 'refresh' | 'templating'
> & {
  uid: string;
  title: string;
  editable: true;
  time: NonNullable<Dashboard['time']>;
  refresh: string;
  templating: { list: NonNullable<NonNullable<Dashboard['templating']>['list']> };
  panels: SwitchyardPanel[];
};

/** Grafana's Dashboard type as JSON. */
export type GrafanaDashboard = Json<Dashboard>;
/** The stricter shape every switchyard dashboard must have. */
export type StrictDashboard = Json<StrictDashboardShape>;
/** Rows are not used (every panel is a data panel); kept importable for checks. */
export type GrafanaRowPanel = Json<RowPanel>;
