/* Keeping the OpenMP thread team usable across fork().
 *
 * libgomp keeps, per thread that started a parallel region, a team of
 * workers parked for the next region. fork() copies only the calling thread,
 * so a child of a process that has run a pass believes in workers that do not
 * exist and its next parallel region waits for them forever. Before every
 * fork the forking thread therefore lets its team go (OpenMP 5.0's
 * omp_pause_resource_all): the child starts without a team and builds a new
 * one on its first pass, and the parent rebuilds its own on its next pass
 * (thread creation, microseconds against a batch's milliseconds). Teams of
 * other threads are not copied into the child and need nothing. */
#include <pthread.h>

#include "deelm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static void release_team_before_fork(void) {
#ifdef _OPENMP
    /* GCC >= 9 and LLVM's libomp have it (GCC 12 still reports _OPENMP as
     * 4.5, so no version test); it fails, harmlessly, only when called
     * inside a parallel region */
    (void)omp_pause_resource_all(omp_pause_hard);
#endif
}

int dl_fork_safety_install(void) {
    return pthread_atfork(release_team_before_fork, NULL, NULL) == 0 ? DL_OK : DL_ERR_NOMEM;
}
